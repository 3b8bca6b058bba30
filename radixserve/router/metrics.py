"""The router's Prometheus metrics (prometheus_client, one registry per router).

Counters are updated on the event loop; the replicas' health, load and approximate
cache sizes are read from the replica set at scrape time, so they never drift and
a removed replica leaves the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from radixserve.router.replicas import ReplicaSet

PREFIX = "radixserve_router_"  # the server's prefix (vLLM-style names), then router_
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_LENGTH_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


class _ReplicaCollector(Collector):
    def __init__(self, replicas: ReplicaSet, cached_tokens: Callable[[str], int]) -> None:
        self.replicas = replicas
        self.cached_tokens = cached_tokens

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily(PREFIX + "replica_healthy", "1 while the replica is in the rotation.",
                                    labels=["replica"])
        inflight = GaugeMetricFamily(PREFIX + "replica_inflight_requests",
                                     "Requests sent to the replica and not finished.", labels=["replica"])
        cached = GaugeMetricFamily(PREFIX + "replica_approx_cached_tokens",
                                   "Size of the router's approximate tree for the replica (key elements).",
                                   labels=["replica"])
        for r in self.replicas:
            healthy.add_metric([r.url], 1.0 if r.healthy else 0.0)
            inflight.add_metric([r.url], r.inflight)
            cached.add_metric([r.url], self.cached_tokens(r.url))
        yield healthy
        yield inflight
        yield cached


class RouterMetrics:
    def __init__(self, replicas: ReplicaSet, cached_tokens: Callable[[str], int]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(PREFIX + "requests", "Requests forwarded, by replica and route (retries included).",
                                ["replica", "route"], registry=reg)
        self.responses = Counter(PREFIX + "responses", "Answers sent to clients, by route and status.",
                                 ["route", "status"], registry=reg)
        self.decisions = Counter(PREFIX + "decisions", "Routing decisions by policy and reason.",
                                 ["policy", "reason"], registry=reg)
        self.match_ratio = Histogram(PREFIX + "match_ratio",
                                     "Share of a prompt key the chosen replica's approximate tree held.",
                                     buckets=_RATIO_BUCKETS, registry=reg)
        self.match_length = Histogram(PREFIX + "match_length",
                                      "Prompt key elements the chosen replica's approximate tree held.",
                                      buckets=_LENGTH_BUCKETS, registry=reg)
        self.retries = Counter(PREFIX + "retries", "Requests sent again to another replica, by cause.",
                               ["reason"], registry=reg)
        self.stream_cuts = Counter(PREFIX + "stream_cuts", "Streams that a replica cut mid-way.", registry=reg)
        self.health_changes = Counter(PREFIX + "replica_health_changes",
                                      "Replicas leaving (down) or joining (up) the rotation.", ["replica", "to"],
                                      registry=reg)
        reg.register(_ReplicaCollector(replicas, cached_tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`, in a text exposition (tests)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())
