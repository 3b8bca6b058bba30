"""Tensor parallelism on the CPU: two ranks over gloo, two processes, against one rank.

Every TP=2 engine here spawns one other process (rank 1) and is shut down (or fails)
inside its test; the fixtures' leak check runs on rank 0's bookkeeping, the only one
there is (the other ranks hold a copy of the request table and their KV heads, no slots
of their own to leak).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.leaks import LIVE_ENGINES, assert_no_leak

from radixserve import SamplingParams
from radixserve.engine.config import EngineConfig
from radixserve.engine.core import EngineFatalError
from radixserve.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[1]

# A shared 20-token head (folded within a batch, then a cache hit), suffixes of several
# lengths, prompts longer than the prefill budget (chunked).
HEAD = [(7 * i + 3) % 250 for i in range(20)]
PROMPTS = [HEAD + [(11 * i + j) % 250 for i in range(n)] for j, n in enumerate((3, 9, 30, 41))] + [[5, 6, 7]]
COMMON = dict(device="cpu", show_progress=False, check_invariants=True, max_prefill_tokens=48)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers.tiny_models import make_tiny_llama, make_tiny_qwen3, make_tiny_qwen3_moe

    root = tmp_path_factory.mktemp("tp-models")
    return {
        "qwen3": make_tiny_qwen3(root / "qwen3"),  # 4 query heads, 2 KV heads: one KV head a rank
        "qwen3_kv1": make_tiny_qwen3(root / "qwen3-kv1", num_key_value_heads=1),  # KV head replicated
        "llama": make_tiny_llama(root / "llama"),  # untied LM head
        "qwen3_moe": make_tiny_qwen3_moe(root / "qwen3-moe"),  # expert slices, a dense layer between
        "qwen3_moe_fused": make_tiny_qwen3_moe(root / "qwen3-moe-fused", fused_experts=True),
    }


def _engine(path: Path, **options: Any) -> Engine:
    engine = Engine(str(path), **{**COMMON, **options})
    LIVE_ENGINES.append(engine)
    return engine


def _close(engine: Engine) -> None:
    """The leak check, then shutdown (the fixture's check would run on a closed engine)."""
    assert_no_leak(engine)
    LIVE_ENGINES.remove(engine)
    engine.shutdown()


def _rounds(engine: Engine, params: SamplingParams, rounds: int = 2) -> list[list[Any]]:
    """Each round generates every prompt in one call; the second meets the first's cache."""
    return [engine.generate(PROMPTS, params, progress=False) for _ in range(rounds)]


def _tokens(outs: list[list[Any]]) -> list[list[list[int]]]:
    return [[o.token_ids for o in round_] for round_ in outs]


def _assert_logprobs_close(want: list[list[Any]], got: list[list[Any]]) -> None:
    for want_round, got_round in zip(want, got):
        for w, g in zip(want_round, got_round):
            assert len(w.logprobs) == len(g.logprobs)
            for a, b in zip(w.logprobs, g.logprobs):
                assert a.token_id == b.token_id
                assert abs(a.logprob - b.logprob) <= 1e-5
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
                assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-5


def _record_logits(engine: Engine) -> list[torch.Tensor]:
    """Every logits tensor rank 0's model computes from now on (all-gathered over the ranks: the
    whole vocabulary), copied as it is made."""
    model = engine.core.runner.model
    compute = model.compute_logits
    seen: list[torch.Tensor] = []

    def recording(hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = compute(hidden, out)
        seen.append(logits.detach().clone())
        return logits

    model.compute_logits = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("model", ["qwen3", "qwen3_kv1", "llama", "qwen3_moe"])
def test_two_ranks_match_one(models, model):
    """Greedy tokens identical to one rank, logprobs (the sampled token's and the top 20 per
    step) within 1e-5; with folding in the batch, chunked prefill and prefix-cache hits.
    The raw logits of every step (rank 0's, gathered from both ranks' vocabulary shares) are
    within 1e-5 of one rank's. Embeddings (final hidden states) and scores (completion
    logprobs) agree as closely."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=20)

    def extras(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = torch.tensor(engine.embed(PROMPTS[:3], pooling="mean"))
        scored = torch.tensor(engine.score(PROMPTS[1], [[9, 8, 7], [9, 8, 6]]))
        return embedded, scored

    with Engine(str(models[model]), **COMMON) as one:
        want_logits = _record_logits(one)
        want = _rounds(one, params)
        want_extras = extras(one)
    two = _engine(models[model], tensor_parallel_size=2)
    got_logits = _record_logits(two)
    got = _rounds(two, params)
    got_extras = extras(two)
    stats = two.stats()
    _close(two)
    assert _tokens(got) == _tokens(want)
    _assert_logprobs_close(want, got)
    assert len(got_logits) == len(want_logits) > len(PROMPTS)  # the same steps, each with its logits
    for w, g in zip(want_logits, got_logits):
        assert w.shape == g.shape and w.shape[-1] == 512  # every vocabulary entry (TINY_VOCAB)
        assert (w - g).abs().max().item() <= 1e-5
    for w, g in zip(want_extras, got_extras):
        assert w.shape == g.shape and torch.allclose(w, g, atol=1e-5, rtol=0)
    assert stats["hit_tokens"] > 0 and stats["folded_tokens"] > 0  # cache and folding were exercised
    assert stats["steps"] > len(PROMPTS)  # chunked: the long prompts took several prefill steps


def test_two_ranks_sample_as_one_with_overlap_and_mlp_fold(models):
    """Seeded sampling: rank 0 samples from the all-gathered logits; with overlapped
    scheduling the next step's input ids are read on the device from the tokens every rank
    received. The mlp fold mode unfolds around each rank's attention heads."""
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=7, ignore_eos=True)
    options = dict(overlap_schedule=True, fold_mode="mlp")
    with Engine(str(models["qwen3_moe_fused"]), **COMMON, **options) as one:
        want = _tokens(_rounds(one, params))
    two = _engine(models["qwen3_moe_fused"], tensor_parallel_size=2, **options)
    got = _tokens(_rounds(two, params))
    _close(two)
    assert got == want


@pytest.mark.parametrize("model", ["qwen3", "llama", "qwen3_moe"])
def test_retraction_and_abort_with_two_ranks(models, model):
    """A KV pool too small for every request's output: requests are retracted and resumed
    (the same tokens as one rank); a streamed request aborted mid-way frees its slots."""
    prompts = [[(13 * i + j) % 250 for i in range(24)] for j in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    options = dict(kv_cache_tokens=100, max_prefill_tokens=16)
    with Engine(str(models[model]), **{**COMMON, **options}) as one:
        want = [o.token_ids for o in one.generate(prompts, params, progress=False)]
    two = _engine(models[model], tensor_parallel_size=2, **options)
    got = [o.token_ids for o in two.generate(prompts, params, progress=False)]
    assert got == want
    assert two.stats()["retractions"] > 0
    stream = two.stream(prompts[0], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # aborts the request
    assert two.wait_idle(60)
    _close(two)


def _worker_pids(engine: Engine) -> list[int]:
    tp = engine.core.tp
    assert tp is not None
    pids = [p.pid for p in tp.procs]
    assert all(pid is not None for pid in pids)
    return [int(pid) for pid in pids if pid is not None]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_a_dead_or_hung_rank_fails_the_engine_within_the_timeout(models, sig):
    """A rank killed, or stopped (alive, never answering), during serving: the next step
    raises EngineFatalError within dist_timeout, and shutdown leaves no process behind."""
    timeout = 8.0
    engine = Engine(str(models["qwen3"]), **COMMON, tensor_parallel_size=2, dist_timeout=timeout)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(engine.generate([[1, 2, 3]], params, progress=False)[0].token_ids) == 4
        (pid,) = _worker_pids(engine)
        os.kill(pid, sig)
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            engine.generate([[4, 5, 6]], params, progress=False)
        assert time.monotonic() - start < timeout + 5
        error = engine.fatal_error
        assert isinstance(error, EngineFatalError), error
        assert "rank" in str(error)
    finally:
        engine.shutdown()
    assert _gone(pid)


def test_an_idle_engine_notices_a_dead_rank_and_shutdown_stops_every_rank(models):
    """No step needed: the idle loop's heartbeat sees the rank gone (EngineFatalError). A clean
    shutdown stops the ranks of a healthy engine; no process outlives either engine."""
    timeout = 8.0
    engine = Engine(str(models["llama"]), **COMMON, tensor_parallel_size=2, dist_timeout=timeout)
    (pid,) = _worker_pids(engine)
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while engine.fatal_error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert isinstance(engine.fatal_error, EngineFatalError)
    finally:
        engine.shutdown()
    healthy = Engine(str(models["llama"]), **COMMON, tensor_parallel_size=2, dist_timeout=timeout)
    (pid,) = _worker_pids(healthy)
    time.sleep(timeout / 2)  # idle past a heartbeat: the rank must still be there
    assert not _gone(pid)
    healthy.shutdown()
    assert _gone(pid)


def test_ranks_that_cannot_share_the_model_are_refused_before_starting(models):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        Engine(str(models["qwen3"]), **COMMON, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="nnodes"):
        Engine(str(models["qwen3"]), **COMMON, tensor_parallel_size=2, nnodes=2)  # no dist_init_addr
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        Engine(str(models["qwen3"]), **COMMON, tensor_parallel_size=0)
    for bad, field in ((dict(dist_init_addr="nohost"), "dist_init_addr"), (dict(dist_timeout=0), "dist_timeout"),
                       (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, dist_init_addr="h:1"), "node_rank"),
                       (dict(tensor_parallel_size=3, nnodes=2, dist_init_addr="h:1"), "nnodes")):
        with pytest.raises(ValueError, match=field):
            EngineConfig(**bad)


def test_two_hosts_meet_at_the_rendezvous(models):
    """nnodes=2 on one machine: 'host' 1 runs its rank only (run_node, as `serve --node-rank 1`
    does), 'host' 0 serves; the ranks meet at dist_init_addr, and the engine's shutdown ends host 1's."""
    from radixserve.engine.tp_driver import free_local_addr, run_node

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine(str(models["llama"]), **COMMON) as one:
        want = [o.token_ids for o in one.generate(PROMPTS, params, progress=False)]
    options = dict(tensor_parallel_size=2, nnodes=2, dist_init_addr=free_local_addr(), dist_timeout=60.0)
    failed: list[int] = []
    other = threading.Thread(target=lambda: failed.append(
        run_node(EngineConfig(**COMMON, **options, node_rank=1), models["llama"])))
    other.start()
    try:
        two = _engine(models["llama"], **options)
        got = [o.token_ids for o in two.generate(PROMPTS, params, progress=False)]
        _close(two)
    finally:
        other.join(timeout=120)
    assert got == want
    assert not other.is_alive() and failed == [0]


# -- sharded loading (no process group needed: the collectives run in forward only) --------

def _load(path: Path, rank: int, size: int) -> dict[str, torch.Tensor]:
    from radixserve.model_runner.loader import load_model
    from radixserve.model_runner.parallel import TPComm, TPShard

    comm = None if size == 1 else TPComm(TPShard(rank, size), None, None)
    model, _ = load_model(path, "cpu", torch.float32, progress=False, comm=comm)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _expected_shard(name: str, full: torch.Tensor, rank: int, n: int, cfg: Any) -> torch.Tensor:
    """What rank `rank` of `n` must hold of the whole parameter `full`, by Megatron's rules."""
    d = cfg.head_dim

    def rows(t: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
        return t.narrow(dim, rank * size // n, size // n)

    if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
        q, k, v = full.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        if cfg.num_kv_heads >= n:
            k, v = rows(k, cfg.kv_size), rows(v, cfg.kv_size)
        else:  # fewer KV heads than ranks: the one its query heads read, shared by n / Hkv ranks
            head = rank * cfg.num_heads // n // (cfg.num_heads // cfg.num_kv_heads)
            k, v = k[head * d : (head + 1) * d], v[head * d : (head + 1) * d]
        return torch.cat([rows(q, cfg.q_size), k, v])
    if name.endswith("o_proj.weight"):
        return rows(full, cfg.q_size, dim=1)
    if name.endswith("gate_up_proj.weight") or name.endswith("w_gate_up"):
        dim = 1 if name.endswith("w_gate_up") else 0
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([rows(gate, gate.shape[dim], dim), rows(up, up.shape[dim], dim)], dim=dim)
    if name.endswith("down_proj.weight"):
        return rows(full, full.shape[1], dim=1)
    if name.endswith("w_down"):
        return rows(full, full.shape[2], dim=2)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return rows(full, cfg.vocab_size)
    return full  # norms, the MoE router


@pytest.mark.parametrize("model, n", [("qwen3", 2), ("qwen3_kv1", 2), ("llama", 2), ("qwen3_moe", 2),
                                      ("qwen3_moe_fused", 2), ("qwen3", 4), ("qwen3_moe", 4)])
def test_each_rank_loads_only_its_slices(models, model, n, monkeypatch):
    """Every parameter of each rank is its Megatron share of the whole model's, and no
    sharded tensor is read whole from the file (only replicated ones go through get_tensor)."""
    from radixserve.model_runner import loader
    from radixserve.model_runner.model_config import ModelConfig

    path = models[model]
    cfg = ModelConfig.from_pretrained(path)
    whole = _load(path, 0, 1)
    read_whole: list[str] = []
    real_read = loader._read

    def spy(f: Any, name: str, target: Any) -> torch.Tensor:
        if target.shard is None:
            read_whole.append(name)
        return real_read(f, name, target)

    monkeypatch.setattr(loader, "_read", spy)
    for rank in range(n):
        read_whole.clear()
        shard = _load(path, rank, n)
        assert shard.keys() == whole.keys()
        for name, param in shard.items():
            assert torch.equal(param, _expected_shard(name, whole[name], rank, n, cfg)), name
        assert read_whole and all("norm" in n or n.endswith((".bias", "mlp.gate.weight")) for n in read_whole)
    assert sum(p.numel() for p in shard.values()) < sum(p.numel() for p in whole.values())


def test_one_rank_keeps_the_plain_layers(models):
    """tensor_parallel_size 1 builds the model as before: nn.Linear and nn.Embedding, no comm,
    so no collective runs and nothing is copied for one."""
    from radixserve.model_runner.loader import load_model
    from radixserve.model_runner.models.parallel_layers import RowParallelLinear, VocabParallelEmbedding

    model, _ = load_model(models["qwen3_moe"], "cpu", torch.float32, progress=False)
    assert model.comm is None
    assert all(getattr(m, "comm", None) is None for m in model.modules())
    assert not any(isinstance(m, (RowParallelLinear, VocabParallelEmbedding)) for m in model.modules())


# -- the command line -------------------------------------------------------------------

def test_tp_flag_reaches_the_engine_from_serve_and_generate(models, monkeypatch):
    """`--tp 2` is tensor_parallel_size for both commands; `generate --tp 2` runs two ranks
    end to end and prints what one rank prints."""
    from radixserve import cli

    seen = []

    class Stop(Exception):
        pass

    def fake_engine(**kwargs: Any) -> None:
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr("radixserve.engine.engine.Engine", fake_engine)
    for argv in (["serve", "--tp", "2", "--port", "0"], ["generate", "hi", "--tensor-parallel-size", "2"]):
        with pytest.raises(Stop):
            cli.main([*argv, "--model", str(models["qwen3"])])
    assert [kw["tensor_parallel_size"] for kw in seen] == [2, 2]

    def run(tp: int) -> str:
        argv = [sys.executable, "-m", "radixserve.cli", "generate", "hello", "--model", str(models["qwen3"]),
                "--device", "cpu", "--max-tokens", "6", "--tp", str(tp), "--no-show-progress"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run(2) == run(1)
