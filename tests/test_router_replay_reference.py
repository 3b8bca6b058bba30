"""`replay --replicas`'s cluster simulation against a brute-force model written here.

The model keeps, per replica, a dict of every cached prefix (a tuple of token ids) with its
last access time, and the points where the engine's radix tree would end a node (the tree
evicts whole leaf nodes, so the model must know where they end): a match ends a node at the
matched length, an insert at the key's end, and evicting a leaf removes the prefixes from the
previous node end to its end. LRU picks the leaf of the oldest access. Routing asks the
router's own policy classes, with loads from this model's own hits, so any difference in hit
tokens also changes the decisions that follow and shows. Hit tokens must agree exactly.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

import pytest

from radixserve.replay.cluster import ClusterSpec, simulate_cluster
from radixserve.replay.formats import TraceRequest
from radixserve.replay.simulate import SimOptions
from radixserve.router.policy import PromptKey, make_policy

Prefix = tuple[int, ...]


class PrefixCache:
    """One replica's cache: every cached prefix of every cached prompt, LRU by whole tree node."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.last: dict[Prefix, int] = {}  # cached prefix -> last access
        self.ends: set[Prefix] = set()  # prefixes where a tree node ends
        self.clock = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _children(self, p: Prefix) -> bool:
        return any(len(q) == len(p) + 1 and q[:-1] == p for q in self.last)

    def _evict(self, need: int, locked: Prefix) -> None:
        freed = 0
        while freed < need:
            leaves = [p for p in self.ends if not self._children(p) and p != locked]
            if not leaves:
                return
            leaf = min(leaves, key=lambda p: self.last[p])
            start = max((len(e) for e in self.ends if len(e) < len(leaf) and leaf[: len(e)] == e), default=0)
            for n in range(start + 1, len(leaf) + 1):
                del self.last[leaf[:n]]
            self.ends.discard(leaf)
            freed += len(leaf) - start

    def serve(self, key: Prefix) -> int:
        """The request's hit tokens; then its prompt is cached (evicting if need be)."""
        hit = 0
        while hit < len(key) and key[: hit + 1] in self.last:
            hit += 1
        now = self._tick()
        for n in range(1, hit + 1):
            self.last[key[:n]] = now
        if hit:
            self.ends.add(key[:hit])
        new = len(key) - hit
        if new and (self.capacity is None or len(key) <= self.capacity):
            used = len(self.last)
            if self.capacity is not None and used + new > self.capacity:
                self._evict(used + new - self.capacity, key[:hit])
            now = self._tick()
            for n in range(1, len(key) + 1):
                self.last[key[:n]] = now
            self.ends.add(key)
        return hit


def reference(requests: Sequence[TraceRequest], replicas: int, route: str, capacity: int | None,
              balance_abs: int = 32, prefill_tps: float = 10_000.0, decode_tps: float = 50.0
              ) -> tuple[int, list[int]]:
    """(hit tokens, requests per replica) of the cluster, by brute force."""
    names = [f"replica-{i}" for i in range(replicas)]
    policy = make_policy(route, capacity if capacity is not None else 1 << 62, balance_abs=balance_abs)
    for name in names:
        policy.add(name)
    caches = {name: PrefixCache(capacity) for name in names}
    busy: dict[str, list[float]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)
    total = 0
    for req in requests:
        assert req.input_ids is not None
        for heap in busy.values():
            while heap and heap[0] <= req.timestamp:
                heapq.heappop(heap)
        name = policy.choose(PromptKey(None, req.input_ids), {n: len(busy[n]) for n in names}).replica
        hit = caches[name].serve(req.input_ids)
        total += hit
        counts[name] += 1
        service = (req.input_length - hit) / prefill_tps + req.output_length / decode_tps
        heapq.heappush(busy[name], req.timestamp + service)
    return total, [counts[n] for n in names]


def shared_prefix_trace(seed: int, n: int, rate: float) -> list[TraceRequest]:
    """Groups of prompts over a few shared heads (some nested), exact repeats, and strays."""
    rng = random.Random(seed)
    heads = [[rng.randrange(50) for _ in range(rng.randint(4, 12))] for _ in range(4)]
    heads.append(heads[0] + [rng.randrange(50) for _ in range(5)])  # a head extending another
    seen: list[list[int]] = []
    reqs = []
    t = 0.0
    for i in range(n):
        r = rng.random()
        if seen and r < 0.15:
            ids = list(rng.choice(seen))  # a repeat: a full hit, ending inside a node
        elif seen and r < 0.25:
            old = rng.choice(seen)
            ids = old[: rng.randint(1, len(old))]  # a prefix of an earlier prompt
        elif r < 0.9:
            ids = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randint(1, 6))]
        else:
            ids = [rng.randrange(50) for _ in range(rng.randint(1, 8))]
        seen.append(ids)
        t += rng.expovariate(rate)
        reqs.append(TraceRequest(index=i, line=i + 1, timestamp=t, input_length=len(ids),
                                 output_length=rng.randint(1, 30), block_size=1, input_ids=tuple(ids)))
    return reqs


CASES = [(seed, route, replicas, capacity)
         for seed in (0, 1, 2)
         for route in ("cache_aware", "round_robin", "least_load")
         for replicas, capacity in ((3, None), (3, 40), (2, 25))]


@pytest.mark.parametrize("seed, route, replicas, capacity", CASES)
def test_cluster_simulation_matches_the_brute_force_model(seed, route, replicas, capacity):
    # A high arrival rate keeps requests in flight, so least_load and the balance rule decide too.
    requests = shared_prefix_trace(seed, 80, rate=20.0)
    spec = ClusterSpec(replicas, route, capacity, balance_abs=2, balance_rel=1.1)
    got = simulate_cluster(requests, [spec], SimOptions(check=True))[0]
    want_hits, want_counts = reference(requests, replicas, route, capacity, balance_abs=2)
    assert got["hit_tokens"] == want_hits
    assert got["replica_requests"] == want_counts
    assert want_hits > 0


def test_the_model_sees_evictions_and_decisions_that_differ():
    """The cases above are not vacuous: a small capacity loses hits, and cache-aware routing
    beats round robin on the shared-prefix trace (both by the model and by the simulation)."""
    requests = shared_prefix_trace(5, 120, rate=2.0)
    unlimited = reference(requests, 3, "cache_aware", None)[0]
    tight = reference(requests, 3, "cache_aware", 25)[0]
    assert tight < unlimited
    aware, rr = (reference(requests, 3, r, 60)[0] for r in ("cache_aware", "round_robin"))
    assert aware > rr
    sims = simulate_cluster(requests, [ClusterSpec(3, r, 60) for r in ("cache_aware", "round_robin")])
    assert [s["hit_tokens"] for s in sims] == [aware, rr]
