"""Keys of the radix tree: every key type, int64 storage, bulk comparison, no views kept."""

from __future__ import annotations

import sys
from array import array

import numpy as np
import pytest
import torch
from helpers.trees import flat
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.radix_tree import RadixTree
from radixserve.radix_tree.keys import common_tokens, first_page, key_views, to_bytes

KEY_TYPES = {
    "list": list,
    "tuple": tuple,
    "range": lambda t: t,  # the tokens below are a range already
    "numpy int64": lambda t: np.array(t, dtype=np.int64),
    "numpy int32": lambda t: np.array(t, dtype=np.int32),
    "numpy strided": lambda t: np.repeat(np.array(t, dtype=np.int64), 2)[::2],
    "array q": lambda t: array("q", t),
    "array i": lambda t: array("i", t),
    "torch": lambda t: torch.tensor(list(t), dtype=torch.int64),
}


@pytest.mark.parametrize("insert_as", sorted(KEY_TYPES))
@pytest.mark.parametrize("match_as", ["list", "numpy int64", "array q", "numpy strided"])
def test_every_key_type_names_the_same_tokens(make_tree, insert_as, match_as):
    tree = make_tree()
    tokens = range(100, 400)
    assert tree.insert(KEY_TYPES[insert_as](tokens), list(range(300))) == 0
    m = tree.match_prefix(KEY_TYPES[match_as](range(100, 250)))
    assert m.length == 150 and flat(m.values) == list(range(150))
    assert m.node.key == tuple(range(100, 250))
    # A key that leaves the shared run at token 200 (inside a galloping window).
    other = list(range(100, 200)) + [7] * 50
    assert tree.insert(KEY_TYPES[match_as](other), list(range(150))) == 100


def test_nodes_hold_one_bytes_object_per_key(make_tree):
    tree = make_tree()
    tree.insert(np.arange(10_000, dtype=np.int64), np.arange(10_000))
    node = tree.match_prefix(np.arange(10_000, dtype=np.int64)).node
    assert type(node.key_bytes) is bytes and len(node.key_bytes) == 8 * 10_000
    assert sys.getsizeof(node.key_bytes) < 8 * 10_000 + 100  # no object per token
    assert node.key == tuple(range(10_000)) and node.num_tokens == 10_000


def test_the_tree_keeps_no_view_of_a_callers_key(make_tree):
    tree = make_tree()
    key = array("q", [1, 2, 3, 4])
    tree.insert(key, [10, 11, 12, 13])
    tree.match_prefix(key)
    key.append(5)  # BufferError if a memoryview of `key` were still alive
    key[0] = 99
    arr = np.array([7, 8, 9], dtype=np.int64)
    tree.insert(arr, [1, 2, 3])
    arr[:] = 0
    assert tree.match_prefix([1, 2, 3, 4]).length == 4
    assert tree.match_prefix([7, 8, 9]).length == 3
    assert tree.match_prefix([0, 0, 0]).length == 0


def test_a_failed_insert_keeps_no_view_of_the_key(make_tree):
    tree = make_tree()
    key = array("q", [1, 2, 3])
    with pytest.raises(ValueError, match="len\\(value\\)") as failure:
        tree.insert(key, [1, 2])
    assert failure.value.__traceback__ is not None  # the frames are still alive here
    key.append(4)
    assert tree.total_size == 0


def test_int64_extremes_round_trip(make_tree):
    tree = make_tree(page_size=2)
    tokens = [-(2**63), 2**63 - 1, -1, 0]
    tree.insert(tokens, [1, 2, 3, 4])
    node = tree.match_prefix(tokens).node
    assert node.key == tuple(tokens)
    assert set(tree.root().children) == {(-(2**63), 2**63 - 1)}
    assert first_page(to_bytes(tokens), 1) == -(2**63)


@pytest.mark.parametrize("bad", [[1.5], [2**63], ["a"], [[1, 2]], None, np.array([[1, 2]])])
def test_keys_that_are_not_int64_raise_value_error(make_tree, bad):
    tree = make_tree()
    with pytest.raises(ValueError, match="int64"):
        tree.match_prefix(bad)
    with pytest.raises(ValueError, match="int64"):
        tree.insert(bad, [0] * 2)
    assert tree.total_size == 0


def test_numpy_and_array_keys_are_read_in_place():
    arr = np.arange(5, dtype=np.int64)
    tokens, raw = key_views(arr)
    assert tokens.obj is not None and np.shares_memory(np.frombuffer(raw, np.int64), arr)
    q = array("q", [3, 4])
    tokens, raw = key_views(q)
    assert tokens.obj is q and tokens.tolist() == [3, 4]
    tokens.release()
    raw.release()


# ------------------------------------------------------------ properties

PAIRS = st.integers(0, 400).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),
        st.integers(0, n),  # where the second key leaves the first (n: nowhere)
        st.integers(0, 400),  # how much the second key runs on
    )
)


@settings(max_examples=300, deadline=None)
@given(PAIRS, st.integers(0, 5))
def test_common_tokens_is_the_first_difference(pair, offset):
    base, leave, extra = pair
    other = [9] * offset + base[:leave] + [4] * (len(base) - leave) + [0] * extra
    limit = min(len(base), len(other) - offset)
    _, raw = key_views(other)
    expected = next((i for i in range(limit) if base[i] != other[offset + i]), limit)
    assert common_tokens(to_bytes(base), raw, 8 * offset, limit) == expected


@settings(max_examples=150, deadline=None)
@given(
    base=st.lists(st.integers(0, 2**40), min_size=1, max_size=600),
    leave=st.integers(0, 600),
    page_size=st.sampled_from([1, 2, 16]),
    key_type=st.sampled_from(["list", "numpy int64", "array q"]),
)
def test_long_keys_split_at_the_first_difference(base, leave, page_size, key_type):
    leave = min(leave, len(base))
    other = base[:leave] + [-1] * (len(base) - leave + 1)
    tree = RadixTree(page_size=page_size)
    convert = KEY_TYPES[key_type]
    whole = len(base) - len(base) % page_size
    tree.insert(convert(base), list(range(len(base))))
    expected = min(leave, whole) - min(leave, whole) % page_size
    m = tree.match_prefix(convert(other))
    assert m.length == expected == m.node.depth
    assert flat(m.values) == list(range(expected))
    assert tree.insert(convert(other), [0] * len(other)) == expected
    assert tree.match_prefix(convert(base)).length == whole
    tree.check()
