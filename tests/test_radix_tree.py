"""Unit tests of radixserve.radix_tree: every operation on hand-built cases."""

from __future__ import annotations

import ast
import pathlib
import re

import numpy as np
import pytest
from helpers.trees import flat

import radixserve.radix_tree as radix_tree_pkg
from radixserve.radix_tree import POLICIES, EvictionPolicy, RadixTree


def evict_order(tree: RadixTree) -> list[list[int]]:
    """Evicts one leaf at a time and returns the freed values in order."""
    order = []
    while tree.evictable_size:
        r = tree.evict(1)
        assert len(r.values) == 1
        order.append(flat(r.values))
        tree.check()
    return order


# --------------------------------------------------------------- match/insert


def test_insert_then_match_returns_the_given_values(make_tree):
    tree = make_tree()
    assert tree.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    m = tree.match_prefix([1, 2, 3, 4, 5])
    assert m.length == 4 and flat(m.values) == [10, 11, 12, 13]
    assert m.node.depth == 4 and m.node.is_leaf
    assert tree.total_size == tree.evictable_size == 4
    miss = tree.match_prefix([9, 9])
    assert miss.length == 0 and miss.values == [] and miss.node.is_root


def test_insert_returns_present_tokens_and_keeps_its_own_values(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3], [10, 11, 12])
    # The caller frees its duplicates value[:3]; the tree keeps 10, 11, 12.
    assert tree.insert([1, 2, 3, 4, 5], [90, 91, 92, 93, 94]) == 3
    assert flat(tree.match_prefix([1, 2, 3, 4, 5]).values) == [10, 11, 12, 93, 94]
    assert tree.insert([1, 2, 3, 4, 5], [0] * 5) == 5
    assert tree.insert([1, 2, 7], [0, 0, 70]) == 2  # splits [1 2 3] at 2
    assert flat(tree.match_prefix([1, 2, 7]).values) == [10, 11, 70]
    assert tree.stats()["inserted_tokens"] == 6
    assert tree.total_size == 6


def test_match_splits_so_the_node_ends_at_the_match(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3, 4, 5, 6], list(range(6)))
    assert tree.num_nodes == 1
    m = tree.match_prefix([1, 2, 3, 9])
    assert m.length == 3 and m.node.depth == 3 and flat(m.values) == [0, 1, 2]
    assert m.node.key == (1, 2, 3) and len(m.node.children) == 1
    (tail,) = m.node.children.values()
    assert tail.key == (4, 5, 6) and flat([tail.value]) == [3, 4, 5] and tail.depth == 6
    assert tree.num_nodes == 2 and tree.total_size == 6
    # Matching exactly at a node boundary does not split again.
    assert tree.match_prefix([1, 2, 3]).node is m.node
    assert tree.num_nodes == 2


def test_match_of_a_key_shorter_than_the_node_splits(make_tree):
    tree = make_tree()
    tree.insert([5, 6, 7, 8], [50, 60, 70, 80])
    m = tree.match_prefix([5, 6])
    assert m.length == 2 and m.node.key == (5, 6) and flat(m.values) == [50, 60]


def test_keys_and_values_of_any_sequence_type(make_tree):
    tree = make_tree()
    slots = np.arange(100, 106)
    tree.insert(np.array([1, 2, 3, 4, 5, 6]), slots)
    m = tree.match_prefix((1, 2, 3, 7))
    assert m.length == 3 and isinstance(m.values[0], np.ndarray)
    # Pieces are slices of what insert was given, never copies or concatenations.
    assert all(np.shares_memory(piece, slots) for piece in m.values)
    assert flat(m.values) == [100, 101, 102]


def test_torch_tensor_values_stay_tensors(make_tree):
    torch = pytest.importorskip("torch")
    tree = make_tree()
    slots = torch.arange(20, 25)
    tree.insert(torch.tensor([1, 2, 3, 4, 5]), slots)
    tree.insert([1, 2, 9], torch.tensor([0, 0, 90]))
    m = tree.match_prefix(torch.tensor([1, 2, 3, 4]))
    assert m.length == 4 and all(isinstance(v, torch.Tensor) for v in m.values)
    assert flat(m.values) == [20, 21, 22, 23]
    assert flat(tree.evict(100).values) and tree.total_size == 0


def test_empty_key(make_tree):
    tree = make_tree()
    assert tree.insert([], []) == 0
    assert tree.match_prefix([]).length == 0
    assert tree.num_nodes == 0 and tree.root() is None


# ------------------------------------------------------------------ page size


def test_page_size_matches_and_inserts_whole_pages_only(make_tree):
    tree = make_tree(page_size=4)
    # 10 tokens: two whole pages inserted, the last 2 stay the caller's.
    assert tree.insert(list(range(10)), list(range(100, 110))) == 0
    assert tree.total_size == 8
    root = tree.root()
    assert list(root.children) == [(0, 1, 2, 3)]  # keyed by the first page tuple
    m = tree.match_prefix(list(range(10)))
    assert m.length == 8 and flat(m.values) == list(range(100, 108))
    # A mismatch inside the second page matches only the first page.
    m = tree.match_prefix([0, 1, 2, 3, 4, 5, 99, 7])
    assert m.length == 4 and m.node.key == (0, 1, 2, 3)
    assert tree.match_prefix([0, 1, 2]).length == 0  # less than a page
    assert tree.stats()["queried_tokens"] == 10 + 8 + 3


def test_page_size_split_and_insert_at_page_boundaries(make_tree):
    tree = make_tree(page_size=2)
    tree.insert([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    # Differs at token index 3 (inside page 2): 2 tokens present.
    assert tree.insert([1, 2, 3, 9, 5, 6], [0, 0, 30, 90, 50, 60]) == 2
    node = tree.root().children[(1, 2)]
    assert node.key == (1, 2) and set(node.children) == {(3, 4), (3, 9)}
    assert flat(tree.match_prefix([1, 2, 3, 9, 5, 6]).values) == [1, 2, 30, 90, 50, 60]
    assert tree.total_size == 10


# ----------------------------------------------------------------- namespaces


def test_namespaces_never_share_nodes(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3], [10, 11, 12])
    assert tree.match_prefix([1, 2, 3], namespace="lora-1").length == 0
    assert tree.insert([1, 2, 3], [20, 21, 22], namespace="lora-1") == 0
    assert flat(tree.match_prefix([1, 2, 3], namespace="lora-1").values) == [20, 21, 22]
    assert flat(tree.match_prefix([1, 2, 3]).values) == [10, 11, 12]
    assert tree.root("lora-1") is not tree.root(None)
    assert tree.total_size == 6 and tree.stats()["namespaces"] == 2


def test_empty_namespace_roots_do_not_leak(make_tree):
    tree = make_tree()
    for salt in range(50):
        tree.insert([1, 2, 3], [1, 2, 3], namespace=("salt", salt))
        tree.match_prefix([7], namespace=("other", salt))  # a miss creates nothing
    assert tree.stats()["namespaces"] == 50
    assert tree.evict(10**9).num_tokens == 150
    assert tree.stats()["namespaces"] == 0 and tree.root(("salt", 0)) is None


def test_miss_in_unknown_namespace_returns_a_lockable_stand_in(make_tree):
    tree = make_tree()
    m = tree.match_prefix([1, 2], namespace="nobody")
    assert m.length == 0 and m.node.depth == 0 and m.node.is_root
    tree.lock(m.node)  # a no-op on a root
    tree.unlock(m.node)
    assert tree.protected_size == 0


# --------------------------------------------------------------- lock/unlock


def test_lock_moves_tokens_between_evictable_and_protected(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    tree.insert([1, 2, 5], [0, 0, 5])
    m = tree.match_prefix([1, 2, 3, 4])
    tree.lock(m.node)
    assert (tree.evictable_size, tree.protected_size) == (1, 4)
    tree.lock(m.node)
    tree.unlock(m.node)
    assert (tree.evictable_size, tree.protected_size) == (1, 4)
    tree.check()
    tree.unlock(m.node)
    assert (tree.evictable_size, tree.protected_size) == (5, 0)


def test_evict_never_touches_locked_nodes(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    tree.insert([1, 2, 8, 9], [0, 0, 8, 9])
    tree.insert([7, 7], [70, 71])
    locked = tree.match_prefix([1, 2, 3, 4])
    tree.lock(locked.node)
    r = tree.evict(10**6)
    assert sorted(flat(r.values)) == [8, 9, 70, 71] and r.num_tokens == 4
    assert tree.evictable_size == 0 and tree.protected_size == 4
    assert flat(tree.match_prefix([1, 2, 3, 4]).values) == [1, 2, 3, 4]
    tree.unlock(locked.node)
    assert sorted(flat(tree.evict(10**6).values)) == [1, 2, 3, 4]


def test_lock_survives_a_split_of_the_locked_node(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3, 4, 5, 6], list(range(6)))
    held = tree.match_prefix([1, 2, 3, 4, 5, 6])
    tree.lock(held.node)
    # Another request splits the locked node in the middle.
    other = tree.match_prefix([1, 2, 3, 9])
    assert other.node.lock_ref == 1 and other.node is held.node.parent
    tree.insert([1, 2, 3, 9], [0, 0, 0, 9])
    tree.check()
    assert flat(tree.evict(10**6).values) == [9]
    # Every value the holder was handed is still cached.
    assert flat(tree.match_prefix([1, 2, 3, 4, 5, 6]).values) == flat(held.values)
    tree.unlock(held.node)
    assert (tree.evictable_size, tree.protected_size) == (6, 0)
    assert tree.evict(10**6).num_tokens == 6


def test_evict_in_steps_frees_at_least_what_was_asked(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3], [1, 2, 3])
    tree.insert([4, 5], [4, 5])
    r = tree.evict(1)
    assert r.num_tokens == 3 and flat(r.values) == [1, 2, 3]  # a whole leaf goes
    assert tree.evict(0).num_tokens == 0
    assert tree.evict(5) == (2, [[4, 5]])
    assert tree.evict(5) == (0, [])
    assert tree.stats()["evicted_tokens"] == 5


def test_parent_becomes_evictable_after_its_last_child(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3], [1, 2, 3])
    tree.insert([1, 2, 4], [0, 0, 4])  # [1 2] -> {[3], [4]}
    assert tree.stats()["evictable_leaves"] == 2
    assert flat(tree.evict(1).values) == [3]
    assert flat(tree.evict(1).values) == [4]
    assert tree.stats()["evictable_leaves"] == 1  # [1 2] is now an unlocked leaf
    assert flat(tree.evict(1).values) == [1, 2]


def test_evict_does_no_rescan(make_tree):
    calls = []

    def counting_key(node):
        calls.append(node.id)
        return (node.last_access,)

    tree = make_tree(policy=EvictionPolicy("counting", counting_key))
    for i in range(500):
        tree.insert([i // 10, 1000 + i], [0, i])  # 50 parents with 10 leaves each
    calls.clear()
    for _ in range(20):
        tree.evict(1)
    # Evicting one leaf only files the parent that became a leaf, if any.
    assert len(calls) <= 20


# ------------------------------------------------------------------ policies


def test_lru_evicts_least_recently_accessed_first(make_tree):
    tree = make_tree(policy="lru")
    tree.insert([1], [1])
    tree.insert([2], [2])
    tree.insert([3], [3])
    tree.match_prefix([1])  # 1 is more recent than 2 and 3
    tree.insert([2], [0])  # insert touches too: 2 is now the most recent
    assert evict_order(tree) == [[3], [1], [2]]


def test_lru_with_an_external_clock(make_tree):
    now = [0.0]
    tree = make_tree(policy="lru", clock=lambda: now[0])
    for key, t in ((1, 5.0), (2, 1.0), (3, 3.0)):
        now[0] = t
        tree.insert([key], [key])
    assert evict_order(tree) == [[2], [3], [1]]


def test_lfu_evicts_fewest_hits_then_least_recent(make_tree):
    tree = make_tree(policy="lfu")
    for key in (1, 2, 3, 4):
        tree.insert([key], [key])
    for key in (1, 1, 1, 2, 3, 3, 2):  # hits: 1->3, 2->2, 3->2, 4->0
        tree.match_prefix([key])
    assert evict_order(tree) == [[4], [3], [2], [1]]


def test_lfu_split_keeps_the_hit_count(make_tree):
    tree = make_tree(policy="lfu")
    tree.insert([1, 2, 3], [1, 2, 3])
    tree.insert([5], [5])
    for _ in range(3):
        tree.match_prefix([1, 2, 3])
    tree.match_prefix([5])
    m = tree.match_prefix([1, 2])  # splits: the upper half has 3 + 1 hits
    assert m.node.hit_count == 4
    assert evict_order(tree) == [[5], [3], [1, 2]]


def test_fifo_evicts_oldest_inserted_first(make_tree):
    tree = make_tree(policy="fifo")
    tree.insert([1], [1])
    tree.insert([2], [2])
    tree.insert([3], [3])
    for key in (1, 1, 2):
        tree.match_prefix([key])  # accesses do not matter to fifo
    assert evict_order(tree) == [[1], [2], [3]]


def test_priority_evicts_lowest_priority_then_least_recent(make_tree):
    tree = make_tree(policy="priority")
    tree.insert([1], [1], priority=5)
    tree.insert([2], [2], priority=1)
    tree.insert([3], [3], priority=1)
    tree.insert([4], [4], priority=0)
    tree.match_prefix([2])  # 2 is more recent than 3 at the same priority
    assert evict_order(tree) == [[4], [3], [2], [1]]


def test_set_priority_refiles_a_listed_node(make_tree):
    tree = make_tree(policy="priority")
    tree.insert([1], [1], priority=1)
    tree.insert([2], [2], priority=2)
    tree.set_priority(tree.match_prefix([2]).node, -1)
    tree.check()
    assert evict_order(tree) == [[2], [1]]


def test_insert_raises_priority_on_the_shared_path(make_tree):
    tree = make_tree(policy="priority")
    tree.insert([1, 2], [1, 2], priority=0)
    tree.insert([1, 2, 3], [0, 0, 3], priority=7)
    tree.insert([9], [9], priority=3)
    assert tree.match_prefix([1, 2]).node.priority == 7
    assert evict_order(tree) == [[9], [3], [1, 2]]


def test_a_custom_policy_object(make_tree):
    deepest_first = EvictionPolicy("deepest", lambda node: (-node.depth,))
    tree = make_tree(policy=deepest_first)
    tree.insert([1], [1])
    tree.insert([2, 2, 2], [2, 2, 2])
    tree.insert([3, 3], [3, 3])
    assert evict_order(tree) == [[2, 2, 2], [3, 3], [1]]


# ---------------------------------------------------------- reset and stats


def test_reset_drops_everything_and_keeps_counters(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3], [1, 2, 3])
    tree.insert([1, 4], [0, 4])
    tree.insert([1, 2], [5, 6], namespace="x")
    m = tree.match_prefix([1, 2, 3])
    tree.lock(m.node)
    with pytest.raises(RuntimeError, match="locked"):
        tree.reset()
    tree.unlock(m.node)
    r = tree.reset()
    assert r.num_tokens == 6 and sorted(flat(r.values)) == [1, 2, 3, 4, 5, 6]
    assert tree.total_size == tree.num_nodes == 0
    stats = tree.stats()
    assert stats["inserted_tokens"] == 6 and stats["hit_tokens"] == 3
    assert stats["namespaces"] == 0
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        tree.lock(m.node)
    assert tree.insert([1, 2, 3], [7, 8, 9]) == 0  # usable again


def test_stats_counts_queries_hits_inserts_and_evictions(make_tree):
    tree = make_tree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    tree.match_prefix([1, 2, 9, 9, 9])
    tree.match_prefix([8])
    tree.evict(2)
    assert tree.stats() == {
        "queried_tokens": 6,
        "hit_tokens": 2,
        "hit_rate": 2 / 6,
        "inserted_tokens": 4,
        "evicted_tokens": 2,
        "nodes": 1,
        "evictable_leaves": 1,
        "namespaces": 1,
        "evictable_size": 2,
        "protected_size": 0,
        "total_size": 2,
    }


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("page_size", [0, -1, 1.5, True, "2"])
def test_bad_page_size(page_size):
    with pytest.raises(ValueError, match="page_size"):
        RadixTree(page_size=page_size)


def test_unknown_policy_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'lru', 'lfu', 'fifo', 'priority'"):
        RadixTree(policy="mru")
    assert set(POLICIES) == {"lru", "lfu", "fifo", "priority"}


def test_bad_arguments(make_tree):
    tree = make_tree()
    with pytest.raises(ValueError, match="len\\(value\\) must equal len\\(key\\)"):
        tree.insert([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="n_tokens"):
        tree.evict(-1)
    with pytest.raises(ValueError, match="n_tokens"):
        tree.evict(1.5)
    with pytest.raises(ValueError, match="namespace must be hashable"):
        tree.match_prefix([1], namespace=["unhashable"])
    with pytest.raises(ValueError, match="clock"):
        RadixTree(clock=3)
    assert tree.total_size == 0


def test_unlock_below_zero_raises(make_tree):
    tree = make_tree()
    tree.insert([1, 2], [1, 2])
    m = tree.match_prefix([1, 2])
    with pytest.raises(RuntimeError, match="below 0"):
        tree.unlock(m.node)
    tree.lock(m.node)
    tree.unlock(m.node)
    with pytest.raises(RuntimeError, match="below 0"):
        tree.unlock(m.node)


def test_lock_of_an_evicted_node_raises(make_tree):
    tree = make_tree()
    tree.insert([1, 2], [1, 2])
    m = tree.match_prefix([1, 2])
    tree.evict(2)
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        tree.lock(m.node)
    assert tree.protected_size == 0


# --------------------------------------------------------------------- check


def _corrupted_tree() -> tuple[RadixTree, list]:
    tree = RadixTree(policy="priority")
    tree.insert([1, 2, 3], [1, 2, 3])
    tree.insert([1, 2, 4], [0, 0, 4])
    tree.insert([7], [7], namespace="ns")
    node = tree.match_prefix([1, 2, 3]).node
    tree.lock(node)
    tree.check()
    return tree, [node, node.parent, tree.match_prefix([1, 2, 4]).node]


@pytest.mark.parametrize(
    "corrupt, invariant",
    [
        (lambda t, n: setattr(t, "_evictable_size", 99), "evictable_size"),
        (lambda t, n: setattr(t, "_protected_size", 1), "protected_size"),
        (lambda t, n: setattr(t, "_num_nodes", 1), "node count"),
        (lambda t, n: setattr(n[0], "lock_ref", 2), "parent lock_ref >= child lock_ref"),
        (lambda t, n: setattr(n[0], "lock_ref", -1), "lock_ref >= 0"),
        (lambda t, n: setattr(n[2], "priority", 5.0), "evictable set keys current"),
        (lambda t, n: t._unlist(n[2]), "evictable set == unlocked leaves"),
        (lambda t, n: setattr(n[2], "value", [1, 2]), "len(value) == len(key)"),
        (lambda t, n: setattr(n[0], "parent", n[2]), "parent/child links"),
        (lambda t, n: setattr(n[2], "key", (5,)), "child key == first token/page"),
        (lambda t, n: setattr(n[2], "key_bytes", b"\0" * 7), "keys are int64 bytes"),
        (lambda t, n: setattr(n[2], "key_bytes", (4,)), "keys are int64 bytes"),
        (lambda t, n: setattr(n[2], "depth", 7), "depth"),
        (lambda t, n: t._roots["ns"].children.clear(), "no empty roots"),
    ],
)
def test_check_names_the_broken_invariant(corrupt, invariant):
    tree, nodes = _corrupted_tree()
    corrupt(tree, nodes)
    with pytest.raises(RuntimeError, match=re.escape(f"invariant '{invariant}'")):
        tree.check()


def test_check_catches_page_misalignment():
    tree = RadixTree(page_size=2)
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    node = tree.match_prefix([1, 2, 3, 4]).node
    node.key, node.value = (1, 2, 3), [1, 2, 3]
    with pytest.raises(RuntimeError, match="invariant 'page alignment'"):
        tree.check()


# ------------------------------------------------------------------- imports


def test_radix_tree_imports_no_torch_and_no_sibling_package():
    package_dir = pathlib.Path(radix_tree_pkg.__file__).parent
    for path in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
                if name.startswith("radixserve."):
                    assert name.startswith("radixserve.radix_tree"), f"{path.name}: {name}"
