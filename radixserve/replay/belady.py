"""Belady's offline optimum on the engine's RadixTree (policy "priority").

Belady (MIN) evicts what is needed furthest in the future. For a prefix cache
the unit is the block (key element) and "needed" means "the prefix ending at
this block is part of a later prompt". A prefix's next use is never earlier
than that of any shorter prefix on its path, so the block needed furthest
away can always be taken from the tail of a leaf: MIN never has to break
the tree.

How it runs on the tree:

* NextUse, built in a first pass over the trace, holds for every element of
  every request the index of the next request whose key starts with the same
  prefix (prefix identity by a chained hash of the elements). This is trace
  metadata, 4 bytes per key element (about 1.2 MB for the 12k-request
  Mooncake conversation trace); the pass also needs a dict over distinct
  prefixes, freed before the replay starts. It is the only part of the replay
  whose memory grows with the trace rather than the capacity.
* After each request, every node on its path gets priority -(next use of the
  node's last element); untouched nodes keep theirs, which stay right because a
  block's next use only changes when it is used.
* The tree evicts a whole leaf; MIN wants only its tail element. So the leaf
  is evicted and re-inserted without its tail. Tail elements whose next use
  ties with the tail's are all MIN's choice, so as many of them go at once as
  the eviction still needs; if they are never used again they all go
  (dropping dead blocks early never costs a hit).

Guarantee: with blocks of one size (token-level traces, or hash-id traces
whose prompts fill their last block) and every prompt fitting in the
capacity, this is the offline optimum, so an upper bound for every online
policy; tests check it against a brute-force search over all eviction
schedules. A prompt longer than the capacity is cut on insert, and there an
online policy beat MIN on about 1% of tiny random traces. The capacity is in tokens, and a partial last
block is smaller than the others; with mixed sizes no greedy rule is optimal
(caching with sizes is NP-hard), and on tiny random traces an online policy
beat MIN in about 0.2% of cases, by a few blocks. On real traces, where
partial blocks are a small share of the tokens, it stays the reference bound.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np

from radixserve.replay.cache_sim import CacheSim
from radixserve.replay.formats import TraceRequest
from radixserve.replay.keys import POS_BITS, POS_MASK

NEVER = 2**31 - 1  # next use of a prefix that is never used again


class NextUse:
    """Next-use request index of every key element of a trace, built in one pass."""

    def __init__(self) -> None:
        self._flat = array("i")
        self.offsets = array("q")
        self._last: dict[int, int] | None = {}  # prefix hash -> flat index of its last use
        self.nu: np.ndarray = np.zeros(0, dtype=np.int32)

    def add(self, index: int, key: Iterable[int]) -> None:
        """Records request ``index``'s key; requests must come in order from 0."""
        if index != len(self.offsets) or self._last is None:
            raise ValueError(f"NextUse.add: expected request {len(self.offsets)}, got {index}")
        flat = self._flat
        last = self._last
        self.offsets.append(len(flat))
        h = 0
        for e in key:
            h = hash((h, e))
            j = last.get(h)
            if j is not None:
                flat[j] = index
            last[h] = len(flat)
            flat.append(NEVER)

    def finish(self) -> NextUse:
        self._last = None
        self.nu = np.frombuffer(self._flat, dtype=np.int32)
        return self

    @classmethod
    def build(cls, keys: Iterable[tuple[int, tuple[int, ...]]]) -> NextUse:
        nu = cls()
        for index, key in keys:
            nu.add(index, key)
        return nu.finish()

    def row(self, index: int, n: int) -> np.ndarray:
        o = self.offsets[index]
        return self.nu[o : o + n]


class BeladySim(CacheSim):
    """CacheSim whose evictions follow MIN, from a NextUse over the same requests."""

    def __init__(
        self, capacity: int | None, next_use: NextUse, check: bool = False, compute_last: bool = False
    ) -> None:
        self._init("belady", capacity, check, compute_last)
        self.next_use = next_use
        # Last request that touched each node, keyed by the handle of the node's
        # last element (unique per node); bounded by the tree's size.
        self.toucher: dict[int, int] = {}

    def _insert_priority(self, req: TraceRequest) -> float:
        return float("-inf")  # nodes on the path keep theirs; _after_insert sets them

    def _after_insert(self, req: TraceRequest, key: tuple[int, ...], m: Any, end: int) -> None:
        if end == 0:
            return
        node = m.node
        if end > m.length:
            parent = node if m.length else self.tree.root()
            assert parent is not None, "the insert before this call made the root"
            node = parent.children[key[m.length]]
        o = self.next_use.offsets[req.index]
        nu = self.next_use.nu
        while node.parent is not None:
            self.tree.set_priority(node, -float(nu[o + node.depth - 1]))
            self.toucher[node.value[-1]] = req.index
            node = node.parent

    def _evict(self, need: int) -> None:
        tree = self.tree
        nu = self.next_use.nu
        freed = 0
        while freed < need:
            r = tree.evict(1)
            if not r.num_tokens:
                break
            piece = r.values[0]
            tail = piece[-1]
            t = self.toucher.pop(tail)
            creator = self.creators[tail >> POS_BITS]
            b = (tail & POS_MASK) + 1
            a = b - len(piece)
            o = self.next_use.offsets[t]
            row = nu[o + a : o + b]  # non-decreasing along the path
            last = row[-1]  # the largest next use of any cached element (the leaf was first)
            keep = int(np.searchsorted(row, last, "left"))  # elements [keep:] all tie at `last`
            if last != NEVER:
                # Ties are all MIN's choice, but each may be needed later: drop only as
                # many as the remaining need takes. (Dead elements all go at once.)
                k = min(b - a - keep, -(-(need - freed) // creator.block_size))
                while k < b - a - keep and creator.span(b - k, b) < need - freed:
                    k += 1
                keep = b - a - k
            if keep:
                base = tail - (tail & POS_MASK)
                present = tree.insert(
                    creator.key[: a + keep], range(base, base + a + keep), priority=-float(row[keep - 1])
                )
                if present != a:
                    raise RuntimeError(f"re-insert found {present} elements present, expected {a}")
                self.toucher[base + a + keep - 1] = t
            freed += self._release(piece, b - a - keep)
        self.used -= freed
        self.evicted_tokens += freed
