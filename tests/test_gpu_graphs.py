"""CUDA-graph decode (model_runner/cuda_graph.py) against the eager forward, on the GPU."""

from __future__ import annotations

import pytest
import torch

from radixserve import SamplingParams
from radixserve.model_runner.attention import available_backends
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.model_runner import ModelRunner

gpu = pytest.mark.gpu
GPU = dict(device="cuda", dtype="bfloat16", kv_cache_tokens=4096)


def _needs_fa4() -> None:
    if "fa4" not in available_backends("cuda"):
        pytest.skip("cuda_graphs needs the fa4 backend")


def test_cuda_graphs_on_cpu_is_a_value_error(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine(str(tiny_qwen3_path), device="cpu", cuda_graphs=True, show_progress=False)


@pytest.mark.parametrize("overlap", [False, True])
def test_staged_graph_inputs_are_the_batch_then_padding(tiny_qwen3_path, monkeypatch, overlap):
    """The graph's input block is staged on the host (no GPU needed): for every decode batch
    the scheduler builds (cache hits, folding, arrivals), the batch's columns, its sequence
    lengths among them, then padding rows."""
    import random

    import numpy as np

    from radixserve.model_runner.cuda_graph import stage_inputs
    from test_engine_cache import run_core, shared_prefix_prompts

    staged = []
    forward = ModelRunner.forward

    def stage_then_forward(self, batch):
        if batch.is_decode:
            n = batch.batch_size
            host = np.full((5, n + 3), -1, dtype=np.int64)
            stage_inputs(host, batch)
            columns = [batch.input_ids, batch.positions, batch.out_slots, batch.req_rows, batch.seq_lens]
            assert host[:, :n].tolist() == [list(map(int, c)) for c in columns]
            assert host[:, n:].tolist() == [[0] * 3] * 4 + [[1] * 3]
            staged.append(n)
        return forward(self, batch)

    monkeypatch.setattr(ModelRunner, "forward", stage_then_forward)
    rng = random.Random(4)
    prompts = shared_prefix_prompts(rng, 10)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    run_core(tiny_qwen3_path, prompts, params, arrivals=[rng.randrange(0, 8) for _ in prompts],
             overlap_schedule=overlap)
    assert len(staged) > 5 and max(staged) > 3


# -- runner level: logits of padded buckets against eager -----------------------------------------


@pytest.fixture(scope="module")
def qwen3_d64(tmp_path_factory):
    """A tiny Qwen3 with a production-like head_dim 64 and GQA 8/2."""
    from tiny_models import make_tiny_qwen3

    return make_tiny_qwen3(
        tmp_path_factory.mktemp("qwen3-d64-graphs"), hidden_size=128, head_dim=64,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
    )


def _runner(path, graphs: bool) -> ModelRunner:
    return ModelRunner(
        path, device=torch.device("cuda"), dtype=torch.bfloat16, max_running_requests=24,
        max_context=None, kv_cache_tokens=16384, gpu_memory_utilization=0.9, attention_backend="fa4",
        cuda_graphs=graphs,
    )


def _batch(runner: ModelRunner, rows: list[int], starts: list[int], tokens: list[torch.Tensor],
           logits_rows: torch.Tensor | None = None) -> ForwardBatch:
    slots = []
    for row, start, toks in zip(rows, starts, tokens):
        new = torch.tensor(runner.allocator.alloc(len(toks)))
        runner.req_to_token.write(row, start, new)
        slots.append(new)
    lens = [len(t) for t in tokens]
    return ForwardBatch(
        input_ids=torch.cat(tokens),
        positions=torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]),
        out_slots=torch.cat(slots), req_rows=rows, prefix_lens=starts, extend_lens=lens,
        logits_rows=torch.tensor(lens).cumsum(0) - 1 if logits_rows is None else logits_rows,
    )


@gpu
def test_graph_decode_logits_match_eager(qwen3_d64):
    """Prefill 24 sequences eagerly, then decode batches of 24, 17, 9, 5, 3, 1 sequences
    (most padded up to a bucket) with the same tokens through both runners."""
    _needs_fa4()
    eager, graphs = _runner(qwen3_d64, False), _runner(qwen3_d64, True)
    assert graphs.graphs is not None and graphs.graphs.buckets == [1, 2, 4, 8, 16, 24]
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 600, (24,), generator=g).tolist()
    rows = list(range(24))[::-1]  # table rows out of order
    kv = dict(zip(rows, lens))
    prompts = [torch.randint(0, 500, (n,), generator=g) for n in lens]
    last = {}
    for runner in (eager, graphs):
        out = runner.forward(_batch(runner, rows, [0] * 24, prompts))
        last = dict(zip(rows, out.logits.argmax(-1).tolist()))
    for step, size in enumerate([24, 17, 9, 5, 3, 1, 16, 2]):
        picked = rows[step % 3 :: 1][:size]
        starts = [kv[r] for r in picked]
        tokens = [torch.tensor([last[r]]) for r in picked]
        subset = torch.tensor([0, size - 1]) if step == 6 else None  # logits of only some rows
        want = eager.forward(_batch(eager, picked, starts, tokens, subset)).logits.cpu()
        got = graphs.forward(_batch(graphs, picked, starts, tokens, subset)).logits.cpu()
        assert got.shape == want.shape
        err = float((got - want).norm() / want.norm())
        assert err < 1e-2, f"step {step} (batch {size}): logits relative error {err:.2e}"
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {step}"
        for r in picked:
            kv[r] += 1
        if subset is None:
            last.update(zip(picked, want.argmax(-1).tolist()))
        else:
            last.update(zip(picked, [7] * size))


# -- engine level: greedy tokens, the prefix cache, retraction, no leaks --------------------------


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(0, 250, (int(k),), generator=g).tolist() for k in torch.randint(3, 90, (n,), generator=g)]
    return base


@gpu
def test_graph_engine_greedy_tokens_equal_eager(tiny_qwen3_path, make_engine):
    """Different max_tokens per request, so the decode batch shrinks through every bucket;
    the second round extends the first round's prompts (prefix-cache hits)."""
    _needs_fa4()
    eager = make_engine(tiny_qwen3_path, max_running_requests=13, cuda_graphs=False, **GPU)
    graphs = make_engine(tiny_qwen3_path, max_running_requests=13, cuda_graphs=True, **GPU)
    assert graphs.core.runner.graphs is not None and eager.core.runner.graphs is None
    first = _prompts(13, 0)
    second = [p + [5, 6, 7] for p in first[:7]] + _prompts(4, 1)
    for round_ in (first, second, first + second):
        params = [
            SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(round_))
        ]
        want = [o.token_ids for o in eager.generate(round_, params, progress=False)]
        got = [o.token_ids for o in graphs.generate(round_, params, progress=False)]
        assert got == want
    assert graphs.stats()["hit_tokens"] > 0


@gpu
def test_graph_engine_with_retraction(tiny_qwen3_path, make_engine):
    """A pool too small for the batch: requests are retracted and resumed, tokens do not change."""
    _needs_fa4()
    small = dict(GPU, kv_cache_tokens=400, max_prefill_tokens=64, max_running_requests=12)
    eager = make_engine(tiny_qwen3_path, cuda_graphs=False, **small)
    graphs = make_engine(tiny_qwen3_path, cuda_graphs=True, **small)
    prompts = _prompts(12, 2)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in eager.generate(prompts, params, progress=False)]
    got = [o.token_ids for o in graphs.generate(prompts, params, progress=False)]
    assert got == want
    assert graphs.stats()["retractions"] > 0


@gpu
def test_graph_engine_sampling_runs(tiny_qwen3_path, make_engine):
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, ignore_eos=True, seed=4)
    _needs_fa4()
    engine = make_engine(tiny_qwen3_path, max_running_requests=8, cuda_graphs=True, **GPU)
    outs = engine.generate(_prompts(10, 3), params, progress=False)
    assert [len(o.token_ids) for o in outs] == [20] * 10


@gpu
def test_graph_needs_fa4(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="cuda_graphs needs the fa4 attention backend"):
        Engine(str(tiny_qwen3_path), attention_backend="torch", cuda_graphs=True, show_progress=False, **GPU)
