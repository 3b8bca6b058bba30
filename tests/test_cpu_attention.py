"""The CPU backend (attention/cpu_backend.py): one padded pass per shape class must equal
the per-sequence reference on every batch the engine builds (decodes, prefill chunks over a
cached prefix, mixed steps, slot lists that share a donor's slots, grouped-query heads),
with a cascade plan, without one, and with the groups it finds itself."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from helpers.cascade_cases import CASES, make_cascade_case

from radixserve.model_runner.attention import create_backend
from radixserve.model_runner.attention.cpu_backend import (
    CPUAttention,
    auto_cascade_plan,
    split_passes,
)
from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.model_runner.forward_batch import CascadePlan, ForwardBatch

HEADS = [(4, 2, 16), (4, 4, 8), (9, 3, 64), (8, 1, 16)]


def _attend(backend, q, k, v, table, batch):
    backend.prepare(batch, table)
    return backend.attend(q, k, v, 1 / math.sqrt(q.shape[-1]))


def _close(got, want, atol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=atol, rtol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}-{}-d{}".format(*h))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("plan", ["given", "none", "found"])
def test_equals_the_reference_on_shared_prefix_batches(case, heads, plan):
    q, k, v, table, batch = make_cascade_case(CASES[case], *heads, seed=len(case) + heads[0])
    plain = dataclasses.replace(batch, cascade=None)
    want = _attend(TorchAttention(), q, k, v, table, plain)
    backend = CPUAttention(auto_cascade_min_prefix=8 if plan == "found" else 0)
    got = _attend(backend, q, k, v, table, batch if plan == "given" else plain)
    _close(got, want)


def _random_batch(rng: random.Random, hq: int, hkv: int, d: int, seqs: list[tuple[int, int]], donor: bool):
    """Sequences (prefix, extend) over random slots; with `donor`, every sequence after the
    first starts with the first one's slots (a radix node or a same-batch donor)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    width = max(p + e for p, e in seqs) + 5
    num_slots = sum(p + e for p, e in seqs) + 50
    perm = (torch.randperm(num_slots, generator=g) + 1).tolist()
    table = torch.randint(1, num_slots + 1, (len(seqs) + 2, width), generator=g)
    rows = rng.sample(range(len(seqs) + 2), len(seqs))
    out_slots, first = [], None
    for (p, e), row in zip(seqs, rows):
        mine = [perm.pop() for _ in range(p + e)]
        if donor and first is not None:
            shared = min(p, len(first))
            mine[:shared] = first[:shared]
        first = first or mine
        table[row, : p + e] = torch.tensor(mine)
        out_slots += mine[p:]
    n = sum(e for _, e in seqs)
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.zeros(n, dtype=torch.int64),
        out_slots=torch.tensor(out_slots),
        req_rows=rows,
        prefix_lens=[p for p, _ in seqs],
        extend_lens=[e for _, e in seqs],
        logits_rows=torch.zeros(0, dtype=torch.int64),
    )
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(num_slots + 1, hkv, d, generator=g)
    v = torch.randn(num_slots + 1, hkv, d, generator=g)
    return q, k, v, table, batch


MIXES = {
    "decodes": [(37, 1), (5, 1), (120, 1), (0, 1)],
    "fresh_prefill": [(0, 17), (0, 9), (0, 30)],
    "chunk_over_prefix": [(64, 32)],
    "mixed_step": [(80, 1), (0, 40), (12, 1), (33, 7), (90, 1)],
    "uneven_chunks": [(0, 200), (3, 2), (150, 5)],  # too uneven to pad together: one pass each
}


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}-{}-d{}".format(*h))
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("donor", [False, True], ids=["own_slots", "donor_slots"])
def test_equals_the_reference_on_mixed_batches(mix, heads, donor):
    q, k, v, table, batch = _random_batch(random.Random(mix), *heads, MIXES[mix], donor)
    want = _attend(TorchAttention(), q, k, v, table, batch)
    for auto in (0, 4):
        _close(_attend(CPUAttention(auto), q, k, v, table, batch), want)


def test_uneven_prefill_chunks_run_apart_and_decodes_together():
    table = torch.arange(1, 1 + 4 * 300).view(4, 300)
    ones = split_passes(table, [0, 1, 2], [0, 0, 0], [50, 60, 70], [0, 1, 2], [1, 1, 1], True, 3)
    assert [(p.b, p.n, p.l) for p in ones] == [(3, 1, 70)]
    uneven = split_passes(table, [0, 1, 2], [0, 0, 0], [200, 5, 5], [0, 200, 202], [200, 2, 2], True, 204)
    assert [(p.b, p.n) for p in uneven] == [(1, 200), (2, 2)]  # a fresh prompt apart from chunks over a prefix
    assert [p.causal for p in uneven] == [True, False]
    apart = split_passes(table, [0, 1, 2, 3], [0] * 4, [200, 5, 5, 70], [0, 200, 202, 204], [200, 2, 2, 60], True, 264)
    assert [(p.b, p.n) for p in apart] == [(1, 200), (1, 2), (1, 2), (1, 60)]  # too uneven to pad together
    fresh = split_passes(table, [0, 1], [0, 0], [30, 20], [0, 30], [30, 20], True, 50)
    assert [(p.b, p.n, p.l, p.causal, p.bias) for p in fresh] == [(2, 30, 30, True, None)]
    even = split_passes(table, [0, 1], [0, 0], [40, 44], [0, 30], [30, 34], True, 64)
    assert [(p.b, p.n, p.l) for p in even] == [(2, 34, 44)]


def test_bfloat16_matches_the_reference():
    q, k, v, table, batch = _random_batch(random.Random(3), 4, 2, 16, MIXES["mixed_step"], True)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    want = _attend(TorchAttention(), q, k, v, table, batch)
    _close(_attend(CPUAttention(4), q, k, v, table, batch), want, atol=2e-2)


def _decode_batch(table: torch.Tensor, lens: list[int]) -> ForwardBatch:
    n = len(lens)
    return ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64), positions=torch.zeros(n, dtype=torch.int64),
        out_slots=torch.zeros(n, dtype=torch.int64), req_rows=list(range(n)),
        prefix_lens=[x - 1 for x in lens], extend_lens=[1] * n, logits_rows=torch.zeros(0, dtype=torch.int64),
    )


def test_auto_plan_groups_neighbours_sharing_leading_slots():
    table = torch.arange(1000, 1000 + 6 * 50).view(6, 50)
    table[1:3, :20] = table[0, :20]  # rows 0-2 share 20 slots
    table[2, 20:30] = table[1, 20:30]  # rows 1-2 share 30
    table[4, :12] = table[3, :12]  # rows 3-4 share 12: below the minimum
    plan = auto_cascade_plan(_decode_batch(table, [40] * 6), table, min_prefix=16)
    assert plan == CascadePlan([3, 1, 1, 1], [20, 0, 0, 0])
    # A shared run never reaches a sequence's tokens of this batch.
    assert auto_cascade_plan(_decode_batch(table, [15, 15, 15, 40, 40, 40]), table, 8) == CascadePlan(
        [3, 2, 1], [14, 12, 0]
    )
    distinct = torch.arange(300).view(6, 50)
    assert auto_cascade_plan(_decode_batch(distinct, [40] * 6), distinct, 8) is None


def test_auto_picks_the_cpu_backend_on_cpu():
    assert create_backend("auto", "cpu", torch.float32, 64).name == "cpu"
    assert create_backend("torch", "cpu").name == "torch"


@pytest.mark.parametrize("fold_mode", ["off", "tree", "mlp"])
def test_engine_tokens_match_the_reference_backend(tiny_qwen3_path, fold_mode, monkeypatch):
    """Prompts sharing a 90-token prefix (long enough for the backend's own groups), chunked
    prefill, decodes: the same greedy tokens as the per-sequence reference."""
    from test_engine_cache import run_core

    from radixserve import SamplingParams
    from radixserve.model_runner.attention import cpu_backend

    found = []

    def counted(*args, **kwargs):
        plan = auto_cascade_plan(*args, **kwargs)
        found.append(plan is not None)
        return plan

    monkeypatch.setattr(cpu_backend, "auto_cascade_plan", counted)

    rng = random.Random(7)
    prefix = [rng.randrange(3, 200) for _ in range(90)]
    prompts = [prefix + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    prompts.append([rng.randrange(3, 200) for _ in range(70)])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    options = dict(fold_mode=fold_mode, max_prefill_tokens=128, arrivals=[0, 0, 0, 2, 2, 5, 5])
    want, _, _ = run_core(tiny_qwen3_path, prompts, params, attention_backend="torch", **options)
    got, core, _ = run_core(tiny_qwen3_path, prompts, params, attention_backend="cpu", **options)
    assert core.runner.backend.name == "cpu"
    assert any(found) and not all(found)  # some steps attended a shared prefix once per group
    assert got == want


def test_the_matmul_path_equals_the_fused_kernel(monkeypatch):
    """Where torch lacks the fused CPU kernel, plain matmuls per K/V head take its place."""
    from radixserve.model_runner.attention import cpu_backend

    q, k, v, table, batch = make_cascade_case(CASES["extend_members"], 9, 3, 16, seed=4)
    want = _attend(CPUAttention(0), q, k, v, table, batch)
    monkeypatch.setattr(cpu_backend, "FUSED_LSE", None)
    _close(_attend(CPUAttention(0), q, k, v, table, batch), want)
    plain = dataclasses.replace(batch, cascade=None)
    _close(_attend(CPUAttention(0), q, k, v, table, plain), _attend(TorchAttention(), q, k, v, table, plain))


def test_cascade_attention_false_stops_the_cpu_backends_own_grouping():
    """cascade_attention=False is honoured on the CPU too: the backend groups nothing itself."""
    assert create_backend("cpu", "cpu").auto_cascade_min_prefix > 0
    assert create_backend("cpu", "cpu", cascade=False).auto_cascade_min_prefix == 0


def test_an_engine_with_cascade_off_builds_a_backend_that_does_not_group(tiny_qwen3_path, make_engine):
    engine = make_engine(tiny_qwen3_path, cascade_attention=False)
    assert engine.core.runner.backend.name == "cpu"
    assert engine.core.runner.backend.auto_cascade_min_prefix == 0
