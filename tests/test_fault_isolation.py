"""A step that raises fails only the requests that caused it; the engine serves on.

Failures are injected where they can happen: inside the model runner's forward, inside the
sampler, in one request's result processing (its detokenizer), and (without the engine's own
validation) the sampler's real IndexError on an out-of-vocabulary stop id. Every engine here
checks its invariants after each step, and the leak check runs after every test.
"""

from __future__ import annotations

import queue

import pytest
from helpers.leaks import LIVE_ENGINES
from helpers.server import http

from radixserve import SamplingParams
from radixserve.engine import core as core_module
from radixserve.engine.detokenizer import IncrementalDetokenizer
from radixserve.model_runner import model_runner as runner_module
from radixserve.model_runner.model_runner import ModelRunner

POISON = 7  # this token id at position 1 makes the patched forward raise
PROMPTS = [[5, 9, 11, 13, 17, 19, 23, 29] * 3, [5, 9, 11, 13, 31, 37], [41, 43, 47, 53, 59, 61, 67], [71, 73, 79, 83]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

ENGINE_VARIANTS = [
    pytest.param({"overlap_schedule": False, "fold_mode": "tree"}, id="sequential-tree"),
    pytest.param({"overlap_schedule": True, "fold_mode": "tree"}, id="overlap-tree"),
    pytest.param({"overlap_schedule": True, "fold_mode": "off", "enable_prefix_cache": False}, id="overlap-nocache"),
    pytest.param({"overlap_schedule": False, "fold_mode": "mlp", "max_prefill_tokens": 8}, id="chunked-mlp"),
]


def _reference(make_engine, path, opts) -> list[list[int]]:
    engine = make_engine(path, **opts)
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY, progress=False)]


def _patch_forward(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    forward = ModelRunner.forward

    def poisoned(self, batch):
        calls.append(batch.num_tokens)
        if ((batch.input_ids == POISON) & (batch.positions == 1)).any():
            raise RuntimeError("injected failure in the model runner")
        return forward(self, batch)

    monkeypatch.setattr(ModelRunner, "forward", poisoned)
    return calls


@pytest.mark.parametrize("opts", ENGINE_VARIANTS)
def test_forward_failure_fails_only_its_cause(make_engine, tiny_qwen3_path, monkeypatch, opts) -> None:
    expected = _reference(make_engine, tiny_qwen3_path, opts)
    _patch_forward(monkeypatch)
    engine = make_engine(tiny_qwen3_path, **opts)
    bad = [3, POISON, 2, 8]
    outs = engine.generate(PROMPTS[:2] + [bad] + PROMPTS[2:], GREEDY, progress=False)
    assert outs[2].finish_reason == "error"
    assert "injected failure in the model runner" in outs[2].outputs[0].error
    assert outs[2].token_ids == []
    good = outs[:2] + outs[3:]
    assert [o.finish_reason for o in good] == ["length"] * 4
    assert [o.token_ids for o in good] == expected
    assert engine.stats()["failed_steps"] >= 1
    assert engine.is_alive()
    # It keeps serving: the same prompts again, now from the cache where it is on.
    again = engine.generate(PROMPTS, GREEDY, progress=False)
    assert [o.token_ids for o in again] == expected


def test_sampler_failure_fails_only_its_cause(make_engine, tiny_qwen3_path, monkeypatch) -> None:
    opts = {"overlap_schedule": True}
    expected = _reference(make_engine, tiny_qwen3_path, opts)
    real_sample = runner_module.sample

    def sample(logits, batch, bitmask=None):
        if any(p.top_k == 7 for p in batch.params):
            raise IndexError("injected failure in the sampler")
        return real_sample(logits, batch, bitmask)

    monkeypatch.setattr(runner_module, "sample", sample)
    engine = make_engine(tiny_qwen3_path, **opts)
    bad = SamplingParams(max_tokens=12, temperature=0.8, top_k=7, seed=3)
    outs = engine.generate(PROMPTS + [PROMPTS[0]], [GREEDY] * 4 + [bad], progress=False)
    assert [o.token_ids for o in outs[:4]] == expected
    assert outs[4].finish_reason == "error" and "IndexError" in outs[4].outputs[0].error
    assert engine.is_alive()


def test_unvalidated_stop_id_fails_in_the_sampler_not_the_engine(make_engine, tiny_qwen3_path) -> None:
    """The reported crash, with the submission check bypassed: the sampler's real failure on a
    stop id past the vocabulary (suppressed by min_tokens) now ends only that request."""
    engine = make_engine(tiny_qwen3_path, overlap_schedule=True)
    vocab = engine.core.runner.vocab_size
    bad = SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[vocab + 5])
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate([PROMPTS[0]], bad, progress=False)  # what a client meets: a clear error
    sinks: dict[str, queue.SimpleQueue] = {}

    def sink_for(rid: str):
        sinks[rid] = queue.SimpleQueue()
        return sinks[rid].put

    good = [(None, list(p), GREEDY) for p in PROMPTS]
    trackers = engine._submit(good[:2] + [(None, list(PROMPTS[3]), bad)] + good[2:], sink_for, stream=False)
    engine._wait(trackers, sinks, False, "test")
    results = [t.result() for t in trackers]
    assert results[2].finish_reason == "error"
    assert [r.finish_reason for r in results[:2] + results[3:]] == ["length"] * 4
    assert engine.generate([PROMPTS[1]], GREEDY, progress=False)[0].finish_reason == "length"


def test_one_requests_processing_failure_fails_it_alone(make_engine, smollm_path, monkeypatch) -> None:
    append = IncrementalDetokenizer.append

    def fragile(self, token_ids):
        if self._stop == ("zzqq",):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return append(self, token_ids)

    engine = make_engine(smollm_path, overlap_schedule=True, max_running_requests=8)
    expected = [o.token_ids for o in engine.generate(PROMPTS, GREEDY, progress=False)]
    monkeypatch.setattr(IncrementalDetokenizer, "append", fragile)
    fragile_params = GREEDY.replace(stop=["zzqq"])
    outs = engine.generate(PROMPTS[:2] + [[1, 2, 3]] + PROMPTS[2:], [GREEDY] * 2 + [fragile_params] + [GREEDY] * 2,
                           progress=False)
    assert outs[2].finish_reason == "error" and "UnicodeDecodeError" in outs[2].outputs[0].error
    assert [o.token_ids for o in outs[:2] + outs[3:]] == expected
    assert engine.stats()["failed_steps"] == 0  # isolated where it happened: no step failed


def test_streams_end_with_an_error_delta(make_engine, tiny_qwen3_path, monkeypatch) -> None:
    _patch_forward(monkeypatch)
    engine = make_engine(tiny_qwen3_path, overlap_schedule=True)
    deltas = list(engine.stream([3, POISON, 5], GREEDY))
    assert deltas[-1].finish_reason == "error" and deltas[-1].error
    ok = list(engine.stream(PROMPTS[0], GREEDY))
    assert ok[-1].finish_reason == "length" and sum(len(d.token_ids) for d in ok) == 12


def test_embed_and_score_failures_raise_for_their_caller(make_engine, tiny_qwen3_path, monkeypatch) -> None:
    _patch_forward(monkeypatch)
    engine = make_engine(tiny_qwen3_path)
    with pytest.raises(RuntimeError, match="failed inside the engine"):
        engine.embed([[3, POISON, 5]])
    with pytest.raises(RuntimeError, match="failed inside the engine"):
        engine.score([3], [[POISON, 5]])  # POISON at position 1
    assert len(engine.embed([PROMPTS[0]])[0]) > 0


def test_steps_that_keep_failing_are_fatal(make_engine, tiny_qwen3_path, monkeypatch) -> None:
    """A failure no request causes (every step raises) ends the engine loudly instead of
    failing every request forever: past MAX_FAILED_STEPS_IN_A_ROW the loop stops."""
    monkeypatch.setattr(core_module, "MAX_FAILED_STEPS_IN_A_ROW", 6)
    engine = make_engine(tiny_qwen3_path)

    def broken(self, batch):
        raise RuntimeError("injected: the runner is broken")

    monkeypatch.setattr(ModelRunner, "forward", broken)
    with pytest.raises(RuntimeError, match="engine loop failed"):
        engine.generate(PROMPTS * 4, GREEDY, progress=False)
    assert not engine.is_alive()
    assert isinstance(engine.fatal_error, core_module.EngineFatalError)
    with pytest.raises(RuntimeError, match="failed earlier"):
        engine.generate(PROMPTS[0], GREEDY, progress=False)
    LIVE_ENGINES.remove(engine)  # a dead engine's pool is not checked for leaks


def test_server_exits_non_zero_once_the_engine_failed(make_engine, tiny_qwen3_path, monkeypatch) -> None:
    """A fatal engine error: the request in flight gets an error, /health a 503 with the cause, and the
    server stops with exit status 1 (so that a supervisor restarts it) instead of serving 503s forever."""
    import time

    from radixserve.server import BackgroundServer, ServerConfig
    from radixserve.server.metrics import parse_metrics

    monkeypatch.setattr(core_module, "MAX_FAILED_STEPS_IN_A_ROW", 2)
    engine = make_engine(tiny_qwen3_path)
    LIVE_ENGINES.remove(engine)  # it dies here: its pool is not checked for leaks
    srv = BackgroundServer(engine, ServerConfig(port=0, drain_timeout=5)).start()
    try:
        monkeypatch.setattr(ModelRunner, "forward", lambda self, batch: 1 / 0)
        for i in range(3):  # each fails alone; the third failed step in a row is fatal
            status, _, body = http(srv.url + "/generate", "POST", {"input_ids": [1, 2, 3], "sampling_params": {
                "max_tokens": 2}})
            assert status == 500 and body["error"]["code"] == "engine_error", body
            if i == 1:  # the first two ended with finish_reason error, each counted once
                scrape = parse_metrics(http(srv.url + "/metrics")[2])
                assert scrape.get("radixserve_request_errors_total") == 2
                assert scrape.get("radixserve_engine_failed_steps_total") == 2
        health = http(srv.url + "/health")
        assert health[0] == 503 and health[2]["status"] in ("engine failed", "draining"), health
        deadline = time.monotonic() + 10
        while srv.exit_status is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.exit_status == 1
        assert isinstance(engine.fatal_error, core_module.EngineFatalError)
    finally:
        srv.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, graphs", [("float32", False), ("bfloat16", True)])
def test_forward_failure_on_the_gpu_with_overlap_and_graphs(make_engine, qwen3_d64, monkeypatch, dtype, graphs) -> None:
    """The CUDA path: overlapped steps, decode and piece graphs (bf16, fa4 where installed), cascade
    attention; the failed step's queued work is dropped (the device checked with a synchronize) and
    the rest carry on. fp32 (the torch backend) keeps exact greedy tokens; bf16 batches of other
    shapes may round differently, so there the others must finish as asked."""
    opts = dict(device="cuda", dtype=dtype, kv_cache_tokens=4096, cuda_graphs=graphs, piecewise_graphs=graphs,
                **({"attention_backend": "torch"} if dtype == "float32" else {}))
    expected = _reference(make_engine, qwen3_d64, opts)
    _patch_forward(monkeypatch)
    engine = make_engine(qwen3_d64, **opts)
    assert engine.core.overlap
    outs = engine.generate(PROMPTS[:2] + [[3, POISON, 2, 8]] + PROMPTS[2:], GREEDY, progress=False)
    assert outs[2].finish_reason == "error"
    good = outs[:2] + outs[3:]
    assert [(o.finish_reason, len(o.token_ids)) for o in good] == [("length", 12)] * 4
    if dtype == "float32":
        assert [o.token_ids for o in good] == expected
    assert engine.is_alive()
