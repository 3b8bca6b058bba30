"""Cluster simulation: a trace spread over N replicas, each its own prefix cache, by a routing policy.

`simulate_cluster` replays requests in trace order. Each request is routed by the
live router's own policy classes (radixserve.router.policy: cache-aware over
approximate trees bounded like each replica's cache, round robin, least load),
then served by the chosen replica's `CacheSim` (the engine's RadixTree at the given
capacity), exactly as `simulate` serves one cache. So a user can compare N replicas
of C tokens with one cache of N x C tokens on their own traffic, before buying it.

Loads (requests in flight, what the balance thresholds and `least_load` read) come
from a service-time model, since a trace records arrivals only: a request occupies
its replica from its timestamp for (uncached prompt tokens / prefill_tps +
output_length / decode_tps) seconds. The model only drives load; hit rates do not
depend on it except through the routing decisions it changes.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixserve.replay.cache_sim import ONLINE_POLICIES, CacheSim
from radixserve.replay.keys import KeyWeights, request_key
from radixserve.replay.simulate import RequestSource, SimOptions, _passes, _scan, nice_window
from radixserve.replay.stats import RunStats
from radixserve.router.policy import POLICIES as ROUTES
from radixserve.router.policy import PromptKey, make_policy


@dataclass(frozen=True)
class ClusterSpec:
    """N replicas of `capacity` tokens each (None: unlimited) under eviction `policy`, routed by `route`."""

    replicas: int
    route: str
    capacity: int | None = None
    policy: str = "lru"
    prefill_tps: float = 10_000.0  # tokens a replica prefills per second (the load model)
    decode_tps: float = 50.0  # tokens per second of one request's decode
    cache_threshold: float = 0.3
    balance_abs: int = 32
    balance_rel: float = 1.1

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if self.policy not in ONLINE_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(ONLINE_POLICIES)} for a cluster, got {self.policy!r}")
        if not (self.prefill_tps > 0 and self.decode_tps > 0):
            raise ValueError("prefill_tps and decode_tps must be > 0")


def _tree_bound(capacity: int | None, block_size: int) -> int:
    """The approximate trees' bound in key elements (a hash-id element is a block of tokens)."""
    if capacity is None:
        return sys.maxsize
    return max(1, capacity // max(1, block_size))


def simulate_cluster(
    source: RequestSource, specs: Sequence[ClusterSpec], options: SimOptions | None = None
) -> list[dict[str, Any]]:
    """One dict per spec: the cluster's hit figures (as `simulate`'s runs) plus per-replica shares."""
    options = options or SimOptions()
    passes = _passes(source)
    trace = _scan(passes(), None, options.insert_output)
    n_warm = int(trace["requests"] * options.warmup)
    window = options.window_s or nice_window(trace["span_s"])
    return [_run(passes(), spec, options, n_warm, trace["t_first"], window) for spec in specs]


def _run(
    requests: Any, spec: ClusterSpec, options: SimOptions, n_warm: int, t_first: float, window: float
) -> dict[str, Any]:
    names = [f"replica-{i}" for i in range(spec.replicas)]
    sims = [CacheSim(spec.policy, spec.capacity, options.check, options.compute_last) for _ in names]
    policy = None
    busy: list[list[float]] = [[] for _ in names]  # finish times of each replica's requests in flight
    stats = RunStats(t_first, window)
    routed = [0] * spec.replicas
    hits = [0] * spec.replicas
    prompts = [0] * spec.replicas
    reasons: dict[str, int] = {}
    peak_load = 0
    for req in requests:
        if policy is None:  # the bound needs the trace's block size
            policy = make_policy(spec.route, _tree_bound(spec.capacity, req.block_size), spec.cache_threshold,
                                 spec.balance_abs, spec.balance_rel)
            for name in names:
                policy.add(name)
        now = req.timestamp
        for heap in busy:
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        loads = {name: len(heap) for name, heap in zip(names, busy)}
        peak_load = max(peak_load, max(loads.values()))
        key = request_key(req, options.insert_output)
        choice = policy.choose(PromptKey(None, key), loads)
        i = names.index(choice.replica)
        r = sims[i].step(req, key, KeyWeights(req, key, options.insert_output))
        service = (req.input_length - r.hit_tokens) / spec.prefill_tps + req.output_length / spec.decode_tps
        heapq.heappush(busy[i], now + service)
        if req.index >= n_warm:
            stats.record(req.timestamp, req.input_length, r.hit_tokens, req.tenant, req.session, req.turn,
                         r.same_session_tokens)
            routed[i] += 1
            hits[i] += r.hit_tokens
            prompts[i] += req.input_length
            reasons[choice.reason] = reasons.get(choice.reason, 0) + 1
    total = sum(routed)
    return {
        "replicas": spec.replicas,
        "route": spec.route,
        "policy": spec.policy,
        "capacity": spec.capacity,
        "total_capacity": None if spec.capacity is None else spec.capacity * spec.replicas,
        **stats.as_dict(),
        "replica_requests": routed,
        "replica_hit_rates": [h / p if p else 0.0 for h, p in zip(hits, prompts)],
        "max_request_share": max(routed) / total if total else 0.0,
        "peak_inflight": peak_load,
        "decisions": reasons,
        "evicted_tokens": sum(s.evicted_tokens for s in sims),
        "uncacheable_requests": sum(s.uncacheable for s in sims),
    }
