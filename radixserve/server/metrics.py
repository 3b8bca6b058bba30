"""Prometheus metrics of the HTTP server, through prometheus_client.

Each server has its own `CollectorRegistry` (two servers in one process never
share a series): the process and platform collectors, the server's own counters
and histograms (updated on its event loop thread), and a collector that reads
`Engine.stats()` at scrape time, so the engine's counters never drift from the
engine. Names start with `radixserve_`; the request histograms take vLLM's names
and buckets, and every engine and request metric has a `model_name` label, as
vLLM's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

PREFIX = "radixserve_"

# Seconds. vLLM's buckets, with finer ones at the low end of TTFT and ITL (a GPU decode step is a few ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)

# (stats key, metric name, type, help): the engine's counters and gauges, read at scrape time.
ENGINE_METRICS = (
    ("queried_tokens", "prefix_cache_queried_tokens", "counter", "Prompt tokens looked up in the radix tree."),
    ("hit_tokens", "prefix_cache_hit_tokens", "counter", "Prompt tokens served from the radix tree."),
    ("inserted_tokens", "prefix_cache_inserted_tokens", "counter", "Tokens inserted into the radix tree."),
    ("evicted_tokens", "prefix_cache_evicted_tokens", "counter", "Tokens evicted from the radix tree."),
    ("prompt_tokens", "prompt_tokens", "counter", "Prompt tokens submitted to the engine."),
    ("generated_tokens", "generation_tokens", "counter", "Tokens sampled by the engine."),
    ("computed_tokens", "computed_tokens", "counter", "Tokens run through the model."),
    ("retractions", "retractions", "counter", "Running requests retracted (preempted) for lack of KV memory."),
    ("folded_tokens", "folded_tokens", "counter", "Prompt tokens computed once for several sequences of a batch."),
    ("attention_compiles", "attention_kernel_compiles", "counter",
     "Attention kernel variants compiled after start (each stalls a step for seconds)."),
    ("steps", "engine_steps", "counter", "Model steps launched (forward passes)."),
    ("failed_steps", "engine_failed_steps", "counter",
     "Steps that raised; the requests that caused them ended with finish_reason error."),
    ("graph_steps", "decode_graph_steps", "counter", "Decode steps that replayed a captured CUDA graph."),
    ("piecewise_steps", "piecewise_graph_steps", "counter",
     "Prefill and mixed steps that replayed captured graph pieces (attention eager)."),
    ("cache_tokens", "prefix_cache_tokens", "gauge", "Tokens held in the radix tree."),
    ("running", "num_requests_running", "gauge", "Sequences running in the engine."),
    ("waiting", "num_requests_waiting", "gauge", "Sequences waiting in the engine's queue."),
    ("kv_usage", "kv_cache_usage_ratio", "gauge", "KV-cache usage: the share of KV slots in use (1 means full)."),
    ("kv_capacity_tokens", "kv_cache_capacity_tokens", "gauge", "KV pool size in tokens."),
    ("hit_rate", "prefix_cache_hit_rate", "gauge", "Hit tokens / queried tokens since start."),
    ("fold_ratio", "fold_ratio", "gauge", "Rows computed / tokens planned since start (1: nothing folded)."),
)


def token_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's buckets for token counts)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out) or (1,)
            out.append(m * scale)
        scale *= 10


class _EngineCollector(Collector):
    """The engine's counters and gauges, and the server's two gauges, read when scraped."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]],
                 server_gauges: Callable[[], dict[str, float]]) -> None:
        self._model = model_name
        self._stats = stats
        self._server_gauges = server_gauges

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration (collect would call the engine)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, name, kind, help_text in ENGINE_METRICS:
            if key not in stats:  # e.g. folding counters of an engine that does not report them
                continue
            family_cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_cls(PREFIX + name, help_text, labels=["model_name"])
            family.add_metric([self._model], float(stats[key]))
            yield family
        helps = {"pending_requests": "Sequences admitted by the server and not finished.",
                 "http_inflight_requests": "HTTP requests being handled."}
        for name, value in self._server_gauges().items():
            gauge = GaugeMetricFamily(PREFIX + name, helps[name], labels=["model_name"])
            gauge.add_metric([self._model], value)
            yield gauge


class ServerMetrics:
    """A server's registry and the series it updates itself (on its event loop thread).

    `stats` is `Engine.stats`; `server_gauges` returns the pending and in-flight counts.
    """

    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], dict[str, Any]],
                 server_gauges: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)
        self.registry.register(_EngineCollector(model_name, stats, server_gauges))
        reg, model = self.registry, ["model_name"]

        def hist(name: str, help_text: str, buckets: Iterable[float]) -> Any:
            return Histogram(PREFIX + name, help_text, model, buckets=tuple(buckets), registry=reg).labels(model_name)

        def counter(name: str, help_text: str) -> Any:
            return Counter(PREFIX + name, help_text, model, registry=reg).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token, per prompt.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token, per prompt.", E2E_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per finished sequence.", tokens)
        self.request_generation_tokens = hist("request_generation_tokens", "Output tokens per finished sequence.",
                                              tokens)
        self._success = Counter(PREFIX + "request_success", "Sequences that finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self.request_errors = counter("request_errors", "Sequences that failed inside the engine (finish_reason "
                                                        "error: a step they caused raised).")
        self.rejected = counter("rejected_requests", "Requests refused with 503 because the queue was full.")
        self.aborted = counter("aborted_requests", "Requests aborted because the client disconnected.")
        self.usage_prompt_tokens = counter("usage_prompt_tokens", "Prompt tokens reported in responses' usage.")
        self.usage_cached_tokens = counter("usage_cached_tokens", "Cached prompt tokens reported in responses' usage.")
        self.usage_completion_tokens = counter("usage_completion_tokens", "Completion tokens reported in responses.")
        self._http = Counter(PREFIX + "http_requests", "HTTP requests by method, route and status.",
                             ["method", "route", "status"], registry=reg)

    def count_http(self, method: str, route: str, status: int) -> None:
        self._http.labels(method, route, str(status)).inc()

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One sequence ended (stop, length, abort; error counts in `request_errors` alone)."""
        if finish_reason == "error":
            self.request_errors.inc()
            return
        self._success.labels(self.model_name, finish_reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(completion_tokens)

    def count_usage(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        self.usage_prompt_tokens.inc(prompt_tokens)
        self.usage_cached_tokens.inc(cached_tokens)
        self.usage_completion_tokens.inc(completion_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of a scrape: Prometheus text format 0.0.4, whatever the
        Accept header. Calls the engine: run it off the event loop."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


@dataclass(frozen=True)
class Scrape:
    """A parsed exposition (tests, benchmarks): `get(name, **labels)` sums the matching samples."""

    samples: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]

    def get(self, name: str, **labels: str) -> float:
        return sum(v for n, ls, v in self.samples if n == name and set(labels.items()) <= set(ls))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}


def parse_metrics(text: str) -> Scrape:
    """Parse a text exposition with prometheus_client's parser."""
    return Scrape(tuple(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text) for s in family.samples
    ))
