"""Property test: RadixTree against a naive model of cached token prefixes.

The model keeps, per namespace, every cached page-aligned prefix (a tuple of
tokens) with the slots that hold its last page and how many live locks cover
it. Each inserted token gets a fresh slot id, so a freed slot names the prefix
it held.
"""

from __future__ import annotations

from array import array

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from radixserve.radix_tree import POLICIES, RadixTree

NAMESPACES = st.sampled_from([None, "lora-a"])
TOKENS = st.integers(0, 3)
KEYS = st.lists(TOKENS, max_size=10)
# The scheduler passes array('q'); numpy int64 is read in place too; lists are converted.
KEY_AS = st.sampled_from(["list", "numpy", "array"])


def as_key(key: list[int], kind: str):
    if kind == "numpy":
        return np.array(key, dtype=np.int64)
    return array("q", key) if kind == "array" else key


class RadixTreeVsModel(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 3]), policy=st.sampled_from(sorted(POLICIES)))
    def make_tree(self, page_size: int, policy: str) -> None:
        self.page = page_size
        self.tree = RadixTree(page_size=page_size, policy=policy)
        self.slot_of: dict[tuple, list] = {}  # (namespace, prefix) -> slots of its last page
        self.prefix_of: dict[int, tuple] = {}  # slot -> (namespace, prefix)
        self.locks: dict[tuple, int] = {}  # (namespace, prefix) -> live locks covering it
        self.handles: list[tuple] = []  # (node, namespace, locked prefix)
        self.known: list[list[int]] = []  # inserted keys, to draw related keys from
        self.next_slot = 0
        self.inserted = self.evicted = self.queried = self.hit = 0

    # --------------------------------------------------------------- model

    def model_match(self, namespace, key) -> int:
        length = 0
        for end in range(self.page, len(key) + 1, self.page):
            if (namespace, tuple(key[:end])) not in self.slot_of:
                break
            length = end
        return length

    def cover(self, namespace, prefix, delta: int) -> None:
        for end in range(self.page, len(prefix) + 1, self.page):
            ident = (namespace, prefix[:end])
            self.locks[ident] = self.locks.get(ident, 0) + delta

    def draw_key(self, data) -> list[int]:
        """A fresh key, or a cut of an inserted key with a short new tail, so
        that matches end inside cached nodes (splits) and paths branch."""
        if self.known and data.draw(st.booleans(), label="related"):
            base = data.draw(st.sampled_from(self.known), label="base")
            cut = data.draw(st.integers(0, len(base)), label="cut")
            return base[:cut] + data.draw(st.lists(TOKENS, max_size=3), label="tail")
        return data.draw(KEYS, label="key")

    # --------------------------------------------------------------- rules

    @rule(namespace=NAMESPACES, as_numpy=st.booleans(), key_as=KEY_AS, data=st.data())
    def insert(self, namespace, as_numpy, key_as, data) -> None:
        key = self.draw_key(data)
        self.known = (self.known + [key])[-16:]
        slots = list(range(self.next_slot, self.next_slot + len(key)))
        self.next_slot += len(key)
        value = np.array(slots, dtype=np.int64) if as_numpy else slots
        expected = self.model_match(namespace, key)
        assert self.tree.insert(as_key(key, key_as), value, namespace=namespace) == expected
        usable = len(key) - len(key) % self.page
        for end in range(expected + self.page, usable + 1, self.page):
            ident = (namespace, tuple(key[:end]))
            self.slot_of[ident] = slots[end - self.page : end]
            for slot in self.slot_of[ident]:
                self.prefix_of[slot] = ident
        self.inserted += max(usable - expected, 0)

    @rule(namespace=NAMESPACES, key_as=KEY_AS, data=st.data())
    def match(self, namespace, key_as, data) -> None:
        self.matched(namespace, self.draw_key(data), key_as)

    def matched(self, namespace, key, key_as="list"):
        m = self.tree.match_prefix(as_key(key, key_as), namespace=namespace)
        length = self.model_match(namespace, key)
        assert m.length == length == m.node.depth
        assert sum(len(piece) for piece in m.values) == length
        got = [int(x) for piece in m.values for x in piece]
        pages = range(self.page, length + 1, self.page)
        assert got == [x for end in pages for x in self.slot_of[(namespace, tuple(key[:end]))]]
        self.queried += len(key)
        self.hit += length
        return m

    @rule(namespace=NAMESPACES, data=st.data())
    def lock(self, namespace, data) -> None:
        key = self.draw_key(data)
        m = self.matched(namespace, key)
        self.tree.lock(m.node)
        prefix = tuple(key[: m.length])
        self.cover(namespace, prefix, +1)
        self.handles.append((m.node, namespace, prefix))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def unlock(self, data) -> None:
        index = data.draw(st.integers(0, len(self.handles) - 1))
        node, namespace, prefix = self.handles.pop(index)
        self.tree.unlock(node)
        self.cover(namespace, prefix, -1)

    @rule(n_tokens=st.integers(0, 12))
    def evict(self, n_tokens) -> None:
        r = self.tree.evict(n_tokens)
        freed = [int(x) for piece in r.values for x in piece]
        assert r.num_tokens == len(freed) == len(set(freed))
        idents = {self.prefix_of.pop(slot) for slot in freed}
        for ident in idents:
            assert self.locks.get(ident, 0) == 0, f"evicted locked prefix {ident}"
            assert set(self.slot_of.pop(ident)) <= set(freed), "evicted part of a page"
        if r.num_tokens < n_tokens:
            assert self.tree.evictable_size == 0
        elif r.values:  # stops right after the leaf that reached n_tokens
            assert r.num_tokens - len(r.values[-1]) < n_tokens
        self.evicted += r.num_tokens

    @rule(namespace=NAMESPACES, priority=st.integers(-3, 3), data=st.data())
    def set_priority(self, namespace, priority, data) -> None:
        self.tree.set_priority(self.matched(namespace, self.draw_key(data)).node, priority)

    @rule()
    def reset(self) -> None:
        if any(prefix for _, _, prefix in self.handles):
            try:
                self.tree.reset()
            except RuntimeError:
                return
            raise AssertionError("reset with locked nodes did not raise")
        r = self.tree.reset()
        assert sorted(int(x) for piece in r.values for x in piece) == sorted(self.prefix_of)
        self.slot_of.clear()
        self.prefix_of.clear()
        self.handles.clear()  # only root locks, which are no-ops

    # ---------------------------------------------------------- invariants

    @invariant()
    def tree_agrees_with_model(self) -> None:
        tree = self.tree
        tree.check()
        # The cache stays prefix-closed: eviction removes leaves only.
        for namespace, prefix in self.slot_of:
            if len(prefix) > self.page:
                assert (namespace, prefix[: -self.page]) in self.slot_of
        locked = sum(1 for ident in self.slot_of if self.locks.get(ident, 0) > 0)
        assert tree.protected_size == locked * self.page
        assert tree.evictable_size == (len(self.slot_of) - locked) * self.page
        stats = tree.stats()
        assert stats["inserted_tokens"] == self.inserted
        assert stats["evicted_tokens"] == self.evicted
        assert stats["queried_tokens"] == self.queried
        assert stats["hit_tokens"] == self.hit


RadixTreeVsModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixTreeVsModel = RadixTreeVsModel.TestCase
