"""The batched sampler: each processor's effect, seeded reproducibility, raw logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.model_runner.sampler import (
    SamplingBatch,
    SamplingRow,
    _mix32,
    process_logits,
    sample,
)
from radixserve.sampling_params import SamplingParams

V = 16


def row(params: SamplingParams | None = None, *, seed: int = 0, step: int = 0, history=(), output=(), suppress=()):
    return SamplingRow(params or SamplingParams(), list(history), list(output), seed, step, list(suppress))


def run(logits: torch.Tensor, rows: list[SamplingRow]):
    return sample(logits, SamplingBatch.build(rows, logits.shape[-1], logits.device))


def draw_counts(logits_row: torch.Tensor, params: SamplingParams, n: int, first_seed: int = 0) -> torch.Tensor:
    """Counts of the tokens n rows (seeds first_seed..first_seed+n-1) draw from the same logits."""
    rows = [row(params, seed=first_seed + i) for i in range(n)]
    tokens = run(logits_row.expand(n, -1).contiguous(), rows).token_ids
    return torch.bincount(tokens, minlength=logits_row.numel()).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic over tokens with probability > 0; inf if a zero-probability token was drawn."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return math.inf
    expected = probs[support].double() * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum())


# 99.9% quantiles of chi-square with df degrees of freedom (fixed seeds: the test is deterministic).
CHI2_999 = {2: 13.8, 3: 16.3, 4: 18.5, 5: 20.5}


def test_greedy_is_argmax_whatever_shares_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(run(logits, [row(greedy) for _ in range(6)]).token_ids, logits.argmax(-1))
    # Greedy rows mixed with sampled rows that use every filter, at several seeds.
    other = SamplingParams(temperature=3.0, top_k=5, top_p=0.8, min_p=0.05)
    rows = [row(greedy, seed=i) if i % 2 == 0 else row(other, seed=i) for i in range(6)]
    tokens = run(logits, rows).token_ids
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    counts = draw_counts(logits, SamplingParams(temperature=temperature), 6000)
    assert chi_square(counts, torch.softmax(logits / temperature, -1)) < CHI2_999[5]
    # The statistic has power: the distribution at another temperature is rejected.
    assert chi_square(counts, torch.softmax(logits / (temperature * 2), -1)) > 4 * CHI2_999[5]


def test_one_seed_over_many_steps_follows_the_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    rows = [row(SamplingParams(), seed=1234, step=s) for s in range(4000)]
    tokens = run(logits.expand(4000, -1).contiguous(), rows).token_ids
    counts = torch.bincount(tokens, minlength=4).double()
    assert chi_square(counts, torch.softmax(logits, -1)) < CHI2_999[3]


def test_top_k_never_leaves_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(V)
    counts = draw_counts(logits, SamplingParams(temperature=5.0, top_k=3), 3000)
    top3 = logits.topk(3).indices
    assert counts[top3].sum() == 3000 and (counts[top3] > 0).all()
    expected = torch.zeros(V)
    expected[top3] = torch.softmax(logits[top3] / 5.0, -1)
    assert chi_square(counts, expected) < CHI2_999[2]


def test_top_k_of_one_row_leaves_the_other_rows_alone():
    torch.manual_seed(5)
    logits = torch.randn(V)
    rows = [row(SamplingParams(temperature=5.0, top_k=2 if i % 2 else -1), seed=i) for i in range(2000)]
    tokens = run(logits.expand(2000, -1).contiguous(), rows).token_ids
    top2 = set(logits.topk(2).indices.tolist())
    assert set(tokens[1::2].tolist()) == top2
    assert set(tokens[0::2].tolist()) == set(range(V))  # unrestricted rows reach every token


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, [0]), (0.65, [0, 1]), (0.75, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    counts = draw_counts(probs.log(), SamplingParams(top_p=top_p), 3000)
    expected = torch.zeros(4)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert chi_square(counts, expected) < CHI2_999.get(len(kept) - 1, 1.0)


def test_top_p_acts_on_the_renormalized_top_k_distribution():
    # top-k 2 leaves [0.4, 0.3] -> [0.57, 0.43]; top-p 0.5 then keeps token 0 only.
    # (Applied to the original distribution, top-p 0.5 would keep tokens 0 and 1.)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    counts = draw_counts(probs.log(), SamplingParams(top_k=2, top_p=0.5), 500)
    assert counts.tolist() == [500, 0, 0, 0]


def test_min_p_drops_tokens_below_min_p_times_max_after_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = draw_counts(probs.log(), SamplingParams(min_p=0.25), 2000)  # threshold 0.125
    assert counts[3] == 0 and (counts[:3] > 0).all()
    # At T=2, p ~ sqrt(p): ratios to the max are [1, .77, .55, .32], so min-p 0.4 keeps 3 tokens;
    # at T=1 the ratios are [1, .6, .3, .1] and min-p 0.4 keeps 2.
    assert draw_counts(probs.log(), SamplingParams(min_p=0.4, temperature=2.0), 2000)[3] == 0
    assert (draw_counts(probs.log(), SamplingParams(min_p=0.4, temperature=2.0), 2000)[:3] > 0).all()
    counts = draw_counts(probs.log(), SamplingParams(min_p=0.4), 2000)
    assert counts[2:].sum() == 0 and (counts[:2] > 0).all()


def test_repetition_penalty_multiplies_negative_and_divides_positive_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    batch = SamplingBatch.build([row(params, history=[0, 1, 1, 5], output=[1])], 6, "cpu")
    out = process_logits(logits, batch)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]]  # the input is not modified
    # It moves the argmax: token 0 (2.0 -> 1.0) now loses to token 1 (1.5).
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    assert run(logits, [row(params, history=[0])]).token_ids.tolist() == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = SamplingBatch.build([row(params, history=[1, 2, 2, 3], output=[2, 2, 3])], 5, "cpu")
    # token 1: prompt only -> untouched; token 2: 1 - 0.5 - 2*0.25; token 3: 1 - 0.5 - 0.25.
    assert process_logits(logits, batch).tolist() == [[1.0, 1.0, 0.0, 0.25, 1.0]]
    negative = SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=-0.5)
    batch = SamplingBatch.build([row(negative, output=[4, 4, 4])], 5, "cpu")
    assert process_logits(logits, batch).tolist() == [[1.0, 1.0, 1.0, 1.0, 3.5]]


def test_all_penalties_compose_and_only_touch_their_rows():
    logits = torch.tensor([[3.0, -1.0, 2.0], [3.0, -1.0, 2.0], [3.0, -1.0, 2.0]])
    both = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    rows = [row(SamplingParams(temperature=0.0), history=[0], output=[0]),
            row(both, history=[0, 1], output=[1, 1]),
            row(SamplingParams(temperature=0.0), history=[2], output=[2])]
    out = process_logits(logits, SamplingBatch.build(rows, 3, "cpu"))
    # Row 1: repetition first (3 -> 1.5, -1 -> -2), then frequency on token 1 (-2 - 2).
    assert out.tolist() == [[3.0, -1.0, 2.0], [1.5, -4.0, 2.0], [3.0, -1.0, 2.0]]


def test_suppressed_ids_are_never_picked():
    torch.manual_seed(2)
    logits = torch.randn(200, V)
    banned = logits.argmax(-1)
    rows = [row(SamplingParams(temperature=0.0 if i % 3 == 0 else 2.0), seed=i, suppress=[int(banned[i]), 0])
            for i in range(200)]
    tokens = run(logits, rows).token_ids
    assert not (tokens == banned).any() and not (tokens == 0).any()
    greedy = torch.arange(0, 200, 3)
    second = logits.index_put((torch.arange(200), banned), torch.tensor(-math.inf))
    second[:, 0] = -math.inf
    assert torch.equal(tokens[greedy], second[greedy].argmax(-1))


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(min_p=0.1, top_k=6, top_p=0.9),
    SamplingParams(temperature=0.0),
    SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, logprobs=2),
    SamplingParams(frequency_penalty=-0.4, temperature=0.9),
]


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(st.tuples(st.integers(0, len(PARAMS) - 1), st.integers(0, 2**70), st.integers(0, 50)),
                   min_size=1, max_size=6),
    data=st.data(),
)
def test_seeded_rows_reproduce_in_any_batch_and_order(picks, data):
    gen = torch.Generator().manual_seed(len(picks))
    logits = torch.randn(len(picks), V, generator=gen) * 2
    rows = [row(PARAMS[p], seed=seed, step=step, history=[1, 2, 2], output=[2, 3], suppress=[5] if step % 2 else [])
            for p, seed, step in picks]
    alone = torch.cat([run(logits[i : i + 1], [r]).token_ids for i, r in enumerate(rows)])
    order = data.draw(st.permutations(range(len(rows))))
    together = run(logits[list(order)], [rows[i] for i in order]).token_ids
    assert torch.equal(together, alone[list(order)])


def test_draws_depend_on_seed_and_step():
    logits = torch.zeros(1, 1000)  # uniform: any two draws collide with probability 1/1000
    tokens = {int(run(logits, [row(seed=s, step=t)]).token_ids) for s in range(5) for t in range(5)}
    assert len(tokens) >= 22
    # Seeds that differ only above bit 32 or only in sign still differ.
    assert len({int(run(logits, [row(seed=s)]).token_ids) for s in (7, 7 + 2**32, 7 + 2**40, -7)}) == 4


def assert_same_sampling_batch(a: SamplingBatch, b: SamplingBatch) -> None:
    """Every field equal: tensors element for element and in dtype, nested parts field by field."""

    def same(x: object, y: object, where: str) -> None:
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif dataclasses.is_dataclass(x):
            assert type(x) is type(y), where
            for f in dataclasses.fields(x):
                same(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
        elif isinstance(x, tuple):
            assert isinstance(y, tuple) and len(x) == len(y), where
            for i, (xi, yi) in enumerate(zip(x, y)):
                same(xi, yi, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    same(a, b, "batch")


# What next_step can move on: no penalties (PARAMS[5] and PARAMS[6] have them).
MOVABLE = PARAMS[:5] + [SamplingParams(logprobs=3, top_k=2)]


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(st.tuples(st.integers(0, len(MOVABLE) - 1), st.integers(0, 2**70), st.integers(0, 2**32 + 3)),
                   min_size=1, max_size=6),
    steps=st.integers(1, 4),
)
def test_next_step_equals_a_build_of_the_rows_one_step_later(picks, steps):
    gen = torch.Generator().manual_seed(len(picks))
    logits = torch.randn(len(picks), V, generator=gen) * 2
    rows = [row(MOVABLE[p], seed=seed, step=step, history=[1, 2], output=[2]) for p, seed, step in picks]
    batch = SamplingBatch.build(rows, V, "cpu")
    for k in range(1, steps + 1):  # steps past 2**32 wrap in the hash, as a build's do
        batch = batch.next_step()
        fresh = SamplingBatch.build([r._replace(step=r.step + k) for r in rows], V, "cpu")
        assert_same_sampling_batch(batch, fresh)
        assert torch.equal(sample(logits, batch).token_ids, sample(logits, fresh).token_ids)


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(st.tuples(st.integers(0, len(MOVABLE) - 1), st.integers(0, 2**64), st.integers(0, 100)),
                   min_size=1, max_size=7),
    data=st.data(),
)
def test_next_step_of_some_rows_equals_a_build_of_those_rows(picks, data):
    rows = [row(MOVABLE[p], seed=seed, step=step) for p, seed, step in picks]
    keep = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=len(rows), unique=True))
    logits = torch.randn(len(keep), V, generator=torch.Generator().manual_seed(len(keep))) * 2
    moved = SamplingBatch.build(rows, V, "cpu").next_step(keep)
    fresh = SamplingBatch.build([rows[i]._replace(step=rows[i].step + 1) for i in keep], V, "cpu")
    assert_same_sampling_batch(moved, fresh)
    assert torch.equal(sample(logits, moved).token_ids, sample(logits, fresh).token_ids)


def test_next_step_of_some_rows_drops_what_they_no_longer_use():
    """Parts only the left-out rows used go, as a build of the kept rows leaves them out."""
    rows = [row(SamplingParams(temperature=0.0)), row(SamplingParams(top_k=3, top_p=0.5, min_p=0.1, logprobs=4)),
            row(SamplingParams(temperature=0.0, logprobs=1))]
    batch = SamplingBatch.build(rows, V, "cpu")
    assert batch.top_k is not None and batch.num_logprobs == 4 and not batch.all_greedy
    greedy_only = batch.next_step([2, 0])
    assert greedy_only.all_greedy and greedy_only.steps is None and greedy_only.top_k is None
    assert greedy_only.top_p is None and greedy_only.log_min_p is None and greedy_only.num_logprobs == 1
    assert_same_sampling_batch(greedy_only, SamplingBatch.build([rows[2], rows[0]], V, "cpu"))
    with pytest.raises(ValueError, match="keep"):
        batch.next_step([])


def test_next_step_draws_what_each_row_draws_alone_at_that_step():
    logits = torch.zeros(3, 1000)  # uniform: the token is the noise's argmax, a function of (seed, step)
    rows = [row(seed=s, step=10 * s) for s in range(3)]
    batch = SamplingBatch.build(rows, 1000, "cpu")
    for k in range(1, 4):
        batch = batch.next_step()
        alone = [int(run(logits[:1], [row(seed=s, step=10 * s + k)]).token_ids) for s in range(3)]
        assert sample(logits, batch).token_ids.tolist() == alone
    assert len(set(alone)) == 3


def test_next_step_needs_a_build_where_tokens_matter():
    """Penalties and suppressed ids depend on the tokens drawn: only a build knows them."""
    assert SamplingBatch.build([row(), row(SamplingParams(repetition_penalty=1.2))], V, "cpu").next_step() is None
    assert SamplingBatch.build([row(), row(SamplingParams(presence_penalty=1.0))], V, "cpu").next_step() is None
    assert SamplingBatch.build([row(), row(suppress=[3])], V, "cpu").next_step() is None
    assert SamplingBatch.build([row(), row(suppress=[3])], V, "cpu").next_step([0]) is None
    greedy = SamplingBatch.build([row(SamplingParams(temperature=0.0))], V, "cpu")
    assert_same_sampling_batch(greedy.next_step(), greedy)


def test_logprobs_are_raw_log_softmax_with_sorted_top_k():
    torch.manual_seed(3)
    logits = torch.randn(4, V) * 3
    rows = [row(SamplingParams(logprobs=5, temperature=0.5, top_k=3, repetition_penalty=1.7), seed=1, history=[0, 1]),
            row(SamplingParams(logprobs=0, temperature=0.0), suppress=[int(logits[1].argmax())]),
            row(SamplingParams(), seed=2),
            row(SamplingParams(logprobs=2, presence_penalty=2.0), seed=3, output=[4])]
    out = run(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert torch.equal(out.top_ids, raw.argsort(-1, descending=True)[:, :5])
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_absent_unless_asked():
    logits = torch.randn(2, V)
    out = run(logits, [row(), row(SamplingParams(temperature=0.0))])
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    out = run(logits, [row(SamplingParams(logprobs=0)), row()])
    assert out.logprobs is not None and out.top_ids is None and out.top_logprobs is None


def test_noise_hash_is_lowbias32():
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789, 0x80000001]
    assert _mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_build_rejects_bad_inputs():
    with pytest.raises(ValueError, match="token ids"):
        SamplingBatch.build([row(SamplingParams(repetition_penalty=1.2), history=[V])], V, "cpu")
    with pytest.raises(ValueError, match="token ids"):
        SamplingBatch.build([row(suppress=[-1])], V, "cpu")
    with pytest.raises(ValueError, match="rows"):
        SamplingBatch.build([], V, "cpu")
    batch = SamplingBatch.build([row(), row()], V, "cpu")
    with pytest.raises(ValueError, match="logits must have shape"):
        sample(torch.zeros(3, V), batch)
