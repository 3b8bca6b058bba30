"""Within-batch folding (RadixMLP) and the scheduler's fold plan.

The oracle is a tiny dict trie written here, independent of the library's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.scheduler import folding
from radixserve.scheduler.fold_plan import build_fold_plan
from radixserve.scheduler.folding import compute_fold_and_scatter


def oracle(ids, pos, cu, roots=None):
    """(compact_ids, compact_pos, scatter, fold_gather) by walking a dict trie."""
    trie: dict = {}
    compact_ids, compact_pos, scatter, gather = [], [], [], []
    for s in range(len(cu) - 1):
        node = ("root", None if roots is None else roots[s])
        for i in range(cu[s], cu[s + 1]):
            node = (node, ids[i], pos[i])
            if node not in trie:
                trie[node] = len(gather)
                gather.append(i)
                compact_ids.append(ids[i])
                compact_pos.append(pos[i])
            scatter.append(trie[node])
    return compact_ids, compact_pos, scatter, gather


def as_lists(fold):
    return tuple(np.asarray(a).tolist() for a in fold)


# ------------------------------------------------------------------ DESIGN.md cases

REFERENCE_CASES = [
    (
        ([1, 2, 3, 1, 2, 4], [0, 1, 2, 0, 1, 2], [0, 3, 6]),
        ([1, 2, 3, 4], [0, 1, 2, 2], [0, 1, 2, 0, 1, 3], [0, 1, 2, 5]),
    ),
    (
        ([1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7], [0, 1, 2, 3] * 3, [0, 4, 8, 12]),
        (
            [1, 2, 3, 4, 5, 6, 7],
            [0, 1, 2, 3, 2, 3, 3],
            [0, 1, 2, 3, 0, 1, 4, 5, 0, 1, 2, 6],
            [0, 1, 2, 3, 6, 7, 11],
        ),
    ),
    (
        ([1, 2, 1, 2], [0, 1, 2, 3], [0, 2, 4]),
        ([1, 2, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]),
    ),
]

KINDS = [
    ("list", None),
    ("numpy", np.int32),
    ("numpy", np.int64),
    ("numpy", np.uint32),
    ("torch", torch.int32),
    ("torch", torch.int64),
    ("torch", torch.uint32),
]


def make(kind, dtype, values):
    if kind == "list":
        return list(values)
    if kind == "numpy":
        return np.asarray(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("case", REFERENCE_CASES)
@pytest.mark.parametrize("kind,dtype", KINDS)
def test_reference_cases_in_every_kind(case, kind, dtype):
    (ids, pos, cu), expected = case
    out = compute_fold_and_scatter(make(kind, dtype, ids), make(kind, dtype, pos), make(kind, dtype, cu))
    for got in out:
        if kind == "list":
            assert type(got) is list
        elif kind == "numpy":
            assert isinstance(got, np.ndarray) and got.dtype == dtype
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.device.type == "cpu"
    assert as_lists(out) == expected


def test_outputs_follow_input_ids_kind_when_arguments_mix():
    out = compute_fold_and_scatter(
        np.array([1, 2, 1, 2], dtype=np.uint32), [0, 1, 0, 1], torch.tensor([0, 2, 4])
    )
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint32 for a in out)
    assert as_lists(out) == ([1, 2], [0, 1], [0, 1, 0, 1], [0, 1])


def test_empty_batch_and_empty_sequences():
    assert as_lists(compute_fold_and_scatter([], [], [0])) == ([], [], [], [])
    assert as_lists(compute_fold_and_scatter([], [], [0, 0, 0], pad_multiple_of=8)) == ([], [], [], [])
    got = compute_fold_and_scatter([7, 8, 7], [0, 1, 0], [0, 0, 2, 2, 3, 3])
    assert as_lists(got) == ([7, 8], [0, 1], [0, 1, 0], [0, 1])


# ------------------------------------------------------------------ properties


@st.composite
def batches(draw, max_seqs=7, roots=False):
    """Sequences cut from a few shared bases over a tiny alphabet, so prefixes
    collide often; positions usually contiguous from a small offset."""
    alphabet = st.integers(0, 3)
    bases = draw(st.lists(st.lists(alphabet, min_size=8, max_size=8), min_size=1, max_size=3))
    ids, pos, cu, keys = [], [], [0], []
    for _ in range(draw(st.integers(0, max_seqs))):
        toks = draw(st.sampled_from(bases))[: draw(st.integers(0, 8))] + draw(
            st.lists(alphabet, max_size=3)
        )
        if draw(st.integers(0, 9)) == 0:  # arbitrary positions now and then
            p = draw(st.lists(st.integers(0, 3), min_size=len(toks), max_size=len(toks)))
        else:
            start = draw(st.sampled_from([0, 0, 0, 1, 5]))
            p = list(range(start, start + len(toks)))
        ids += toks
        pos += p
        cu.append(len(ids))
        keys.append(draw(st.sampled_from(["A", "A", "B", 3])))
    return (ids, pos, cu, keys) if roots else (ids, pos, cu)


@settings(max_examples=300, deadline=None)
@given(batches(), st.sampled_from([None, 1, 3, 8]))
def test_fold_equals_trie_and_unfolds_exactly(batch, pad):
    ids, pos, cu = batch
    compact_ids, compact_pos, scatter, gather = as_lists(
        compute_fold_and_scatter(
            np.array(ids, dtype=np.int64), np.array(pos, dtype=np.int32), np.array(cu, dtype=np.int64), pad
        )
    )
    want = oracle(ids, pos, cu)
    live = len(want[3])
    # one row per unique path, first-occurrence order: exactly the trie's rows
    assert (compact_ids[:live], compact_pos[:live], scatter, gather[:live]) == want
    assert [compact_ids[r] for r in scatter] == ids
    assert [compact_pos[r] for r in scatter] == pos
    assert [ids[g] for g in gather[:live]] == compact_ids[:live]
    if pad is not None:
        assert len(compact_ids) % pad == 0 and len(compact_ids) - live < pad
        assert compact_ids[live:] == compact_pos[live:] == gather[live:] == [0] * (len(compact_ids) - live)
    assert all(r < live for r in scatter)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), max_size=8, unique_by=lambda s: s[0]))
def test_identity_when_nothing_is_shared(seqs):
    ids = [t for s in seqs for t in s]
    cu = np.cumsum([0] + [len(s) for s in seqs]).tolist()
    pos = [p for s in seqs for p in range(len(s))]
    ident = list(range(len(ids)))
    assert as_lists(compute_fold_and_scatter(ids, pos, cu)) == (ids, pos, ident, ident)


@settings(max_examples=50, deadline=None)
@given(batches(max_seqs=5))
def test_ids_and_positions_beyond_32_bits(batch):
    ids, pos, cu = batch
    ids = [t - 2**40 if t % 2 else t for t in ids]  # negative and huge ids
    pos = [p + 2**33 for p in pos]
    got = compute_fold_and_scatter(np.array(ids, dtype=np.int64), np.array(pos, dtype=np.int64), cu)
    assert as_lists(got) == oracle(ids, pos, cu)


def test_large_batch_matches_trie():
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 1000, 200)
    seqs = [np.concatenate([prefix[: rng.integers(0, 200)], rng.integers(0, 3, 56)]) for _ in range(64)]
    ids = np.concatenate(seqs)
    pos = np.concatenate([np.arange(s.size) for s in seqs])
    cu = np.cumsum([0] + [s.size for s in seqs])
    got = as_lists(compute_fold_and_scatter(ids, pos, cu))
    want = oracle(ids.tolist(), pos.tolist(), cu.tolist())
    assert got == want and len(want[3]) < ids.size / 2


def test_only_the_sharing_sequences_are_folded():
    """Two of six sequences share a prefix: the fold runs on just those two."""
    seqs = [[1, 2, 3], [9, 8], [1, 2, 4, 5], [7], [6, 6, 6, 6], [5, 4]]
    ids = [t for s in seqs for t in s]
    pos = [p for s in seqs for p in range(len(s))]
    cu = np.cumsum([0] + [len(s) for s in seqs]).tolist()
    assert as_lists(compute_fold_and_scatter(ids, pos, cu)) == oracle(ids, pos, cu)


# ------------------------------------------------------------------ exactness never rests on the hash


@pytest.mark.parametrize(
    "bad_hash",
    [
        lambda ids, pos, *a: np.zeros(ids.size, np.uint64),  # every path alike
        lambda ids, pos, *a: (ids * 1000 + pos).astype(np.uint64),  # alike when the last (id, pos) is
    ],
)
def test_colliding_hashes_fall_back_to_exact(monkeypatch, bad_hash):
    """Hashes only propose; a colliding hash must still give the exact fold."""
    monkeypatch.setattr(folding, "_path_hashes", bad_hash)
    (ids, pos, cu), expected = REFERENCE_CASES[1]
    assert as_lists(compute_fold_and_scatter(ids, pos, cu)) == expected
    ids, pos, cu = [9, 1, 2, 9, 3, 2], [0, 1, 2, 0, 1, 2], [0, 3, 6]  # the 2s differ in parent
    assert as_lists(compute_fold_and_scatter(ids, pos, cu)) == oracle(ids, pos, cu)


def test_unordered_positions_resolved_without_the_trie(monkeypatch):
    """Same (token, position) multiset in another order: the order-free first
    hash collides; the depth-mixing retry must separate them."""
    monkeypatch.setattr(folding, "fold_rows_trie", lambda *a: pytest.fail("trie fallback used"))
    ids, pos, cu = [1, 2, 3, 1, 3, 2], [5, 6, 7, 5, 7, 6], [0, 3, 6]
    assert as_lists(compute_fold_and_scatter(ids, pos, cu)) == oracle(ids, pos, cu)


def test_paths_match_rejects_a_wrong_grouping():
    # [1, 2] and [3, 2] at the same positions: the two 2s differ in their parent.
    ids = np.array([1, 2, 3, 2], dtype=np.int64)
    pos = np.array([0, 1, 0, 1], dtype=np.int64)
    starts = np.array([0, 2])
    right = np.array([0, 1, 2, 3])
    wrong = np.array([0, 1, 2, 1])
    assert folding._paths_match(right, ids, pos, starts, np.int64(-1), True)
    assert not folding._paths_match(wrong, ids, pos, starts, np.int64(-1), True)
    # other roots: the first tokens differ in their root sentinel
    same_root = np.array([0, 1, 0, 1])
    ids2 = np.array([1, 2, 1, 2], dtype=np.int64)
    assert folding._paths_match(same_root, ids2, pos, starts, np.int64(-1), True)
    assert not folding._paths_match(same_root, ids2, pos, starts, -1 - np.array([0, 1]), True)


def test_first_equal_with_clustered_hashes():
    """Low-entropy hashes (all in one round-0 bucket) still group exactly,
    through the remixed rounds."""
    rng = np.random.default_rng(1)
    h = rng.integers(0, 40, 500).astype(np.uint64)
    first: dict[int, int] = {}
    want = [first.setdefault(int(v), i) for i, v in enumerate(h)]
    ramp, scratch = np.arange(h.size, dtype=np.int32), np.empty(h.size, np.uint64)
    assert folding._first_equal(h, ramp, scratch).tolist() == want


# ------------------------------------------------------------------ validation

BAD_INPUTS = [
    (dict(input_ids=[1, 2], position_ids=[0], cu_seqlens=[0, 2]), "position_ids"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[1, 2]), "cu_seqlens"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[]), "cu_seqlens"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[0, 2, 1, 2]), "cu_seqlens"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[0, 1]), "cu_seqlens"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[0, 3]), "cu_seqlens"),
    (dict(input_ids=[[1, 2]], position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=np.zeros((1, 2), np.int64), position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=np.int64(3), position_ids=[0], cu_seqlens=[0, 1]), "input_ids"),
    (dict(input_ids=[1.0, 2.0], position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=[True, False], position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=["a"], position_ids=[0], cu_seqlens=[0, 1]), "input_ids"),
    (dict(input_ids=[2**70], position_ids=[0], cu_seqlens=[0, 1]), "input_ids"),
    (dict(input_ids=np.array([1, 2], np.int16), position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=np.array([1.0, 2.0]), position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=torch.tensor([1.0, 2.0]), position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=torch.tensor([1, 2], dtype=torch.int16), position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids="12", position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=None, position_ids=[0, 1], cu_seqlens=[0, 2]), "input_ids"),
    (dict(input_ids=[1, 2], position_ids=np.array([[0, 1]]), cu_seqlens=[0, 2]), "position_ids"),
    (dict(input_ids=[1, 2], position_ids=[0.5, 1], cu_seqlens=[0, 2]), "position_ids"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=[[0, 2]]), "cu_seqlens"),
    (dict(input_ids=[1, 2], position_ids=[0, 1], cu_seqlens=np.array([0.0, 2.0])), "cu_seqlens"),
    (dict(input_ids=np.array([1], np.int32), position_ids=[2**31], cu_seqlens=[0, 1]), "position_ids"),
    (dict(input_ids=np.array([1], np.uint32), position_ids=[-1], cu_seqlens=[0, 1]), "position_ids"),
    (dict(input_ids=[1], position_ids=[0], cu_seqlens=[0, 1], pad_multiple_of=0), "pad_multiple_of"),
    (dict(input_ids=[1], position_ids=[0], cu_seqlens=[0, 1], pad_multiple_of=-8), "pad_multiple_of"),
    (dict(input_ids=[1], position_ids=[0], cu_seqlens=[0, 1], pad_multiple_of=True), "pad_multiple_of"),
    (dict(input_ids=[1], position_ids=[0], cu_seqlens=[0, 1], pad_multiple_of=8.0), "pad_multiple_of"),
    (dict(input_ids=[1], position_ids=[0], cu_seqlens=[0, 1], pad_multiple_of="8"), "pad_multiple_of"),
]


@pytest.mark.parametrize("kwargs,name", BAD_INPUTS)
def test_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        compute_fold_and_scatter(**kwargs)


# ------------------------------------------------------------------ fold plan


def split(batch):
    ids, pos, cu, keys = batch
    return (
        [ids[a:b] for a, b in zip(cu, cu[1:])],
        [pos[a:b] for a, b in zip(cu, cu[1:])],
        keys,
    )


@settings(max_examples=200, deadline=None)
@given(batches(roots=True), st.sampled_from([None, 4]))
def test_plan_equals_trie_with_one_namespace_per_root(batch, pad):
    ids, pos, cu, keys = batch
    seq_ids, seq_pos, _ = split(batch)
    plan = build_fold_plan(seq_ids, seq_pos, keys, pad_multiple_of=pad)
    want_ids, want_pos, want_scatter, want_gather = oracle(ids, pos, cu, keys)
    m = plan.num_rows
    assert m == len(want_gather)
    assert plan.scatter.tolist() == want_scatter
    assert plan.fold_gather[:m].tolist() == want_gather
    assert plan.compact_ids[:m].tolist() == want_ids
    assert plan.compact_positions[:m].tolist() == want_pos
    assert not plan.compact_ids[m:].any() and not plan.fold_gather[m:].any()
    assert plan.fold_ratio == (m / len(ids) if ids else 1.0)
    assert plan.cu_seqlens.tolist() == cu
    for s, (a, b) in enumerate(zip(cu, cu[1:])):
        assert plan.last_rows[s] == (want_scatter[b - 1] if b > a else -1)
        made_earlier = sum(1 for i in range(a, b) if want_gather[want_scatter[i]] < a)
        assert plan.folded_tokens[s] == made_earlier


def test_plan_roots_and_contained_sequences():
    node_a, node_b = object(), object()
    plan = build_fold_plan(
        [[5, 6, 7], [5, 6, 9], [5, 6], [5, 6], []],
        [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1], []],
        [node_a, node_a, node_b, node_a, node_a],
    )
    assert plan.scatter.tolist() == [0, 1, 2, 0, 1, 3, 4, 5, 0, 1]
    assert plan.fold_gather.tolist() == [0, 1, 2, 5, 6, 7]
    assert plan.last_rows.tolist() == [2, 3, 5, 1, -1]  # seq 3 has no rows of its own
    assert plan.folded_tokens.tolist() == [0, 2, 0, 2, 0]
    assert plan.num_rows == 6 and plan.fold_ratio == 6 / 10


def test_plan_accepts_numpy_sequences():
    ids = [np.array([1, 2, 3], np.int32), np.array([1, 2, 4], np.uint32)]
    pos = [np.arange(3), np.arange(3)]
    plan = build_fold_plan(ids, pos, ["r", "r"], pad_multiple_of=8)
    assert plan.num_rows == 4 and plan.compact_ids.size == 8
    assert plan.compact_ids.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "args,name",
    [
        (([[1, 2]], [[0]], ["r"]), "positions"),
        (([[1, 2]], [[0, 1]], ["r", "s"]), "root_keys"),
        (([[1, 2]], [[0, 1]], [["unhashable"]]), "root_keys"),
        (([[1.5]], [[0]], ["r"]), "token_ids"),
        ((np.array([[1, 2]]), [[0, 1]], ["r"]), "token_ids"),
        (([np.array([1.0])], [[0]], ["r"]), "token_ids"),
        (([[1]], [[0]], ["r"], 0), "pad_multiple_of"),
    ],
)
def test_plan_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        build_fold_plan(*args)
