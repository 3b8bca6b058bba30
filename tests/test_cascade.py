"""Cascade attention (attention/cascade.py, batch_builder.plan_cascade): a group's shared
prefix attended once, each member's suffix apart, merged by log-sum-exp, must equal plain
attention; the planner must group only what truly shares slots; and engines with cascade
on and off must give the same tokens."""

from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

import pytest
import torch
from helpers.cascade_cases import CASES, make_cascade_case
from test_engine_cache import run_core

from radixserve import SamplingParams
from radixserve.model_runner.attention.cascade import merge_states, reference_attend_lse
from radixserve.model_runner.attention.metadata import build_varlen_metadata
from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.scheduler.batch_builder import SharedSlots, plan_cascade, shared_slots
from radixserve.scheduler.request import token_array


def _attend(q, k, v, table, batch):
    backend = TorchAttention()
    backend.prepare(batch, table)
    return backend.attend(q, k, v, 1 / math.sqrt(q.shape[-1]))


@pytest.mark.parametrize("heads", [(4, 2, 16), (4, 4, 8), (8, 1, 16)], ids=lambda h: "h{}-{}-d{}".format(*h))
@pytest.mark.parametrize("case", sorted(CASES))
def test_cascade_equals_plain_attention(case, heads):
    q, k, v, table, batch = make_cascade_case(CASES[case], *heads, seed=len(case))
    got = _attend(q, k, v, table, batch)
    want = _attend(q, k, v, table, dataclasses.replace(batch, cascade=None))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_reference_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v, table, batch = make_cascade_case(CASES["extend_members"], 4, 2, 8, seed=5)
    meta = build_varlen_metadata(dataclasses.replace(batch, cascade=None), table)
    scale = 1 / math.sqrt(8)
    out, lse = reference_attend_lse(q, k, v, scale, meta, True)
    # The last query row of the first sequence sees every key of it.
    n_keys = int(meta.seqused_k[0])
    last = int(meta.cu_seqlens_q[1]) - 1
    keys = k[table[batch.req_rows[0], :n_keys]].repeat_interleave(2, dim=1)  # [L, Hq, D]
    scores = torch.einsum("hd,lhd->hl", q[last], keys) * scale
    assert torch.allclose(lse[:, last], torch.logsumexp(scores, -1), atol=1e-5)
    assert lse.shape == (q.shape[1], q.shape[0])
    assert torch.allclose(out, _attend(q, k, v, table, dataclasses.replace(batch, cascade=None)), atol=1e-5)


def test_merge_takes_the_suffix_alone_where_nothing_is_shared():
    g = torch.Generator().manual_seed(0)
    o_p = torch.full((3, 2, 4), float("nan"))  # whatever a kernel leaves in an empty prefix row
    o_s = torch.randn(3, 2, 4, generator=g)
    lse_p = torch.full((2, 3), float("nan"))
    lse_s = torch.randn(2, 3, generator=g)
    shared = torch.tensor([False, False, False])
    assert torch.equal(merge_states(o_p, lse_p, o_s, lse_s, shared), o_s)


def test_merge_weights_two_halves_by_their_mass():
    o_p, o_s = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    lse_p, lse_s = torch.tensor([[math.log(3.0)]]), torch.tensor([[0.0]])  # masses 3 and 1
    out = merge_states(o_p, lse_p, o_s, lse_s, torch.tensor([True]))
    assert torch.allclose(out, torch.full((1, 1, 2), 0.75))


# -- the planner ----------------------------------------------------------------------------------


def _req(slots):
    return SimpleNamespace(slots=token_array(slots))


def test_shared_slots_finds_the_first_difference():
    base = list(range(100, 400))
    a = _req(base + [1, 2, 3])
    b = _req(base[:250] + [7, 8])
    memo = SharedSlots()
    assert shared_slots(a, b, memo) == 250
    assert shared_slots(a, _req([5] + base), memo) == 0
    assert shared_slots(a, _req(base[:1] + [9]), memo) == 1


def test_shared_slots_memo_follows_the_lists():
    base = list(range(1000, 1300))
    a, b = _req(base + [1]), _req(base[:200] + [2])
    memo = SharedSlots()
    assert shared_slots(a, b, memo) == 200
    assert memo.get(b, a.slots, b.slots) == 200
    b.slots.append(3)  # appending past a difference changes nothing
    assert shared_slots(a, b, memo) == 200
    b.slots = token_array(base + [4])  # a commit re-points the request at the tree's slots
    assert memo.get(b, a.slots, b.slots) is None
    assert shared_slots(a, b, memo) == 300
    memo.forget(b)
    assert memo.get(b, a.slots, b.slots) is None


def test_shared_slots_never_trusts_a_list_that_is_not_prefix_closed():
    a = _req([1, 2, 3, 4, 5, 6, 7, 8])
    b = _req([1, 9, 3, 4, 5, 6, 7, 8, 10])  # equal around a difference: the search alone would say 8
    assert shared_slots(a, b, SharedSlots()) == 0


def test_plan_groups_neighbours_and_caps_at_their_prefix():
    shared = list(range(500, 800))  # 300 slots
    reqs = [
        _req(shared + [1, 2]),
        _req(shared + [3]),
        _req(shared[:280] + [4, 5]),  # shares 280 with its neighbour
        _req([9] + shared),  # shares nothing
        _req(list(range(900, 1000)) + [6]),
        _req(list(range(900, 1000)) + [7]),
    ]
    prefix_lens = [302, 300, 281, 301, 100, 100]
    plan = plan_cascade(reqs, prefix_lens, [n + 1 for n in prefix_lens], min_prefix=64, memo=SharedSlots())
    assert plan.group_sizes == [3, 1, 2]
    assert plan.prefix_lens == [280, 0, 100]
    assert plan.shared_lens == [280, 280, 280, 0, 100, 100]
    # A prefix never reaches a member's tokens of this batch.
    plan = plan_cascade(reqs[:2], [250, 300], [251, 301], min_prefix=64, memo=SharedSlots())
    assert plan.prefix_lens == [250]


def test_plan_is_none_when_too_little_is_shared():
    shared = list(range(100))
    reqs = [_req(shared + [1] + list(range(2000, 3000))), _req(shared + [2] + list(range(4000, 5000)))]
    lens = [len(r.slots) - 1 for r in reqs]
    # 100 of 2,200 keys:
    assert plan_cascade(reqs, lens, [n + 1 for n in lens], min_prefix=64, memo=SharedSlots()) is None
    assert plan_cascade(reqs, lens, [n + 1 for n in lens], min_prefix=128, memo=SharedSlots()) is None
    assert plan_cascade(reqs[:1], lens[:1], [lens[0] + 1], min_prefix=1, memo=SharedSlots()) is None


# -- engines: cascade on and off ------------------------------------------------------------------


def _shared_prompts(seed: int, groups: int, per_group: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        stem = [rng.randrange(1, 500) for _ in range(rng.randrange(30, 60))]
        prompts += [stem + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 8))] for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("fold_mode", ["tree", "off"])
def test_engine_cascade_on_and_off_give_the_same_tokens(tiny_qwen3_path, overlap, fold_mode):
    prompts = _shared_prompts(0, 3, 5)
    arrivals = [0] * 8 + [3] * 4 + [9] * 3  # later arrivals hit the cache, join running groups
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    options = dict(arrivals=arrivals, fold_mode=fold_mode, overlap_schedule=overlap, max_prefill_tokens=96)
    want, _, want_reqs = run_core(tiny_qwen3_path, prompts, greedy, cascade_attention=False, **options)
    got, core, got_reqs = run_core(
        tiny_qwen3_path, prompts, greedy, cascade_attention=True, cascade_min_prefix=16, **options
    )
    assert got == want
    assert core.stats()["cascade_batches"] > 0
    for a, b in zip(got_reqs, want_reqs):
        assert [t for t, _, _ in a.output_logprobs] == [t for t, _, _ in b.output_logprobs]
        assert max(abs(x - y) for (_, x, _), (_, y, _) in zip(a.output_logprobs, b.output_logprobs)) < 1e-4


def test_engine_cascade_with_seeded_sampling(tiny_qwen3_path):
    prompts = _shared_prompts(1, 2, 6)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, ignore_eos=True)
    want, _, _ = run_core(tiny_qwen3_path, prompts, params, cascade_attention=False)
    got, core, _ = run_core(tiny_qwen3_path, prompts, params, cascade_attention=True, cascade_min_prefix=16)
    assert got == want
    assert core.stats()["cascade_batches"] > 0


def test_cascade_off_by_default_on_cpu_and_options_checked(tiny_qwen3_path):
    from radixserve import Engine

    _, core, _ = run_core(tiny_qwen3_path, _shared_prompts(2, 2, 4), SamplingParams(max_tokens=3, ignore_eos=True))
    assert core.scheduler.config.cascade_min_prefix == 0 and core.stats()["cascade_batches"] == 0
    with pytest.raises(ValueError, match="cascade_attention"):
        Engine(str(tiny_qwen3_path), device="cpu", cascade_attention="yes", show_progress=False)
    with pytest.raises(ValueError, match="cascade_min_prefix"):
        Engine(str(tiny_qwen3_path), device="cpu", cascade_min_prefix=0, show_progress=False)


def test_forcing_cascade_on_a_backend_without_it_is_a_value_error(tiny_qwen3_path, monkeypatch):
    from radixserve import Engine
    from radixserve.model_runner.attention.torch_backend import TorchAttention

    monkeypatch.setattr(TorchAttention, "supports_cascade", False)  # as torch_varlen declares
    with pytest.raises(ValueError, match="cascade_attention needs an attention backend that supports it"):
        Engine(
            str(tiny_qwen3_path), device="cpu", attention_backend="torch", cascade_attention=True, show_progress=False
        )
