"""CUDA-graph decode (model_runner/graphs/decode.py) against the eager forward, on the GPU."""

from __future__ import annotations

import pytest
import torch
from helpers.runner import make_runner
from helpers.tiny_models import runner_batch

from radixserve import SamplingParams
from radixserve.model_runner.forward_batch import CascadePlan
from radixserve.model_runner.model_runner import ModelRunner

gpu = pytest.mark.gpu
GPU = dict(device="cuda", dtype="bfloat16", kv_cache_tokens=4096)


# -- runner level: logits of padded buckets against eager -----------------------------------------


def _runner(path, graphs: bool) -> ModelRunner:
    return make_runner(path, max_running_requests=24, kv_cache_tokens=16384, gpu_memory_utilization=0.9,
                       attention_backend="fa4", cuda_graphs=graphs)


@gpu
def test_graph_decode_logits_match_eager(needs_fa4, qwen3_d64):
    """Prefill 24 sequences eagerly, then decode batches of 24, 17, 9, 5, 3, 1 sequences
    (most padded up to a bucket) with the same tokens through both runners."""
    eager, graphs = _runner(qwen3_d64, False), _runner(qwen3_d64, True)
    assert graphs.graphs is not None and graphs.graphs.buckets == [1, 2, 4, 8, 16, 24]
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 600, (24,), generator=g).tolist()
    rows = list(range(24))[::-1]  # table rows out of order
    kv = dict(zip(rows, lens))
    prompts = [torch.randint(0, 500, (n,), generator=g) for n in lens]
    last = {}
    for runner in (eager, graphs):
        out = runner.forward(runner_batch(runner, rows, [0] * 24, prompts))
        last = dict(zip(rows, out.logits.argmax(-1).tolist()))
    for step, size in enumerate([24, 17, 9, 5, 3, 1, 16, 2]):
        picked = rows[step % 3 :: 1][:size]
        starts = [kv[r] for r in picked]
        tokens = [torch.tensor([last[r]]) for r in picked]
        subset = torch.tensor([0, size - 1]) if step == 6 else None  # logits of only some rows
        want = eager.forward(runner_batch(eager, picked, starts, tokens, subset)).logits.cpu()
        got = graphs.forward(runner_batch(graphs, picked, starts, tokens, subset)).logits.cpu()
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


@gpu
def test_cascade_decode_logits_match_plain(needs_fa4, qwen3_d64):
    """Groups of sequences sharing prefix slots (as cached prefixes do): decode steps with a
    cascade plan, eager and under CUDA graphs (padded buckets, a lazily captured cascade
    graph), against the eager forward without one."""
    runners = {"plain": _runner(qwen3_d64, False), "graphs": _runner(qwen3_d64, True)}
    g = torch.Generator().manual_seed(5)
    groups = [(300, 5), (0, 1), (120, 3), (500, 1), (0, 1), (260, 6)]  # (shared prefix, members)
    stems = [torch.randint(0, 500, (p,), generator=g) for p, _ in groups]
    owns = [[torch.randint(0, 500, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
             for _ in range(m)] for _, m in groups]
    rows = list(range(17))[::-1]
    kv = {}
    for runner in runners.values():
        it = iter(rows)
        for (p, _), stem, own in zip(groups, stems, owns):
            first = next(it)
            runner.forward(runner_batch(runner, [first], [0], [torch.cat([stem, own[0]])]))
            kv[first] = p + len(own[0])
            for tokens in own[1:]:
                row = next(it)
                runner.req_to_token.table[row, :p] = runner.req_to_token.table[first, :p]
                runner.forward(runner_batch(runner, [row], [p], [tokens]))
                kv[row] = p + len(tokens)
    plan = CascadePlan([m for _, m in groups], [p for p, _ in groups])
    for step, size in enumerate([17, 17, 9]):
        picked = rows[:size]
        step_plan = plan if size == 17 else CascadePlan([5, 1, 3], [300, 0, 120])
        starts = [kv[r] for r in picked]
        tokens = [torch.tensor([(7 * r + step) % 500]) for r in picked]
        want = runners["plain"].forward(runner_batch(runners["plain"], picked, starts, tokens)).logits.float().cpu()
        for name, runner in runners.items():
            batch = runner_batch(runner, picked, starts, tokens)
            batch.cascade = step_plan
            got = runner.forward(batch).logits.float().cpu()
            err = float((got - want).norm() / want.norm())
            assert err < 1e-2, f"{name} step {step}: logits relative error {err:.2e}"
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9, f"{name} step {step}"
        for r in picked:
            kv[r] += 1


# -- engine level: greedy tokens, the prefix cache, retraction, no leaks --------------------------


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(0, 250, (int(k),), generator=g).tolist() for k in torch.randint(3, 90, (n,), generator=g)]
    return base


@gpu
def test_graph_engine_greedy_tokens_equal_eager(needs_fa4, tiny_qwen3_path, make_engine):
    """Different max_tokens per request, so the decode batch shrinks through every bucket;
    the second round extends the first round's prompts (prefix-cache hits)."""
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
def test_graph_engine_with_retraction(needs_fa4, tiny_qwen3_path, make_engine):
    """A pool too small for the batch: requests are retracted and resumed, tokens do not change."""
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
def test_graph_engine_sampling_runs(needs_fa4, tiny_qwen3_path, make_engine):
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, ignore_eos=True, seed=4)
    engine = make_engine(tiny_qwen3_path, max_running_requests=8, cuda_graphs=True, **GPU)
    outs = engine.generate(_prompts(10, 3), params, progress=False)
    assert [len(o.token_ids) for o in outs] == [20] * 10


@gpu
def test_graph_needs_fa4(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="cuda_graphs needs an attention backend that runs under CUDA graphs"):
        Engine(str(tiny_qwen3_path), attention_backend="torch", cuda_graphs=True, show_progress=False, **GPU)


@gpu
def test_cascade_engine_tokens_match_plain(needs_fa4, tiny_qwen3_path, make_engine):
    """Groups of requests sharing a 150-token prompt stem, bf16 under graphs: cascade on and
    off agree (bf16 sums in another order may flip a near-tie, so the tokens must agree up
    to the first difference for at least 90% of them)."""
    g = torch.Generator().manual_seed(11)
    prompts = []
    for _ in range(3):
        stem = torch.randint(0, 250, (150,), generator=g).tolist()
        prompts += [stem + torch.randint(0, 250, (int(k),), generator=g).tolist()
                    for k in torch.randint(1, 12, (5,), generator=g)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    on = make_engine(tiny_qwen3_path, max_running_requests=16, cascade_attention=True, cascade_min_prefix=64, **GPU)
    off = make_engine(tiny_qwen3_path, max_running_requests=16, cascade_attention=False, **GPU)
    want = [o.token_ids for o in off.generate(prompts, params, progress=False)]
    got = [o.token_ids for o in on.generate(prompts, params, progress=False)]
    agree = 0
    for a, b in zip(got, want):
        while a and b and a[0] == b[0]:
            a, b, agree = a[1:], b[1:], agree + 1
    assert agree >= 0.9 * sum(len(w) for w in want), (got, want)
    assert on.stats()["cascade_batches"] > 0 and off.stats()["cascade_batches"] == 0
