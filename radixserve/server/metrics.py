"""Prometheus text exposition (format 0.0.4) for the HTTP server.

The server owns a few counters and latency histograms of its own (updated only
on its event loop thread, so no locks); everything about the cache and the
queues comes from `Engine.stats()` at scrape time, so the two never drift.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

# Seconds. TTFT spans queueing and prefill; ITL is one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

PREFIX = "radixserve_"

# (stats key, metric name, type, help): the engine's counters and gauges, exported as they are.
_ENGINE_METRICS = (
    ("queried_tokens", "prefix_cache_queried_tokens", "counter", "Prompt tokens looked up in the radix tree."),
    ("hit_tokens", "prefix_cache_hit_tokens", "counter", "Prompt tokens served from the radix tree."),
    ("inserted_tokens", "prefix_cache_inserted_tokens", "counter", "Tokens inserted into the radix tree."),
    ("evicted_tokens", "prefix_cache_evicted_tokens", "counter", "Tokens evicted from the radix tree."),
    ("prompt_tokens", "prompt_tokens", "counter", "Prompt tokens submitted to the engine."),
    ("generated_tokens", "generation_tokens", "counter", "Tokens sampled by the engine."),
    ("computed_tokens", "computed_tokens", "counter", "Tokens run through the model."),
    ("retractions", "retractions", "counter", "Running requests retracted for lack of KV memory."),
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
    ("kv_usage", "kv_cache_usage_ratio", "gauge", "Share of KV slots not on the free list."),
    ("kv_capacity_tokens", "kv_cache_capacity_tokens", "gauge", "KV pool size in tokens."),
    ("hit_rate", "prefix_cache_hit_rate", "gauge", "hit_tokens / queried_tokens since start."),
    ("fold_ratio", "fold_ratio", "gauge", "Rows computed / tokens planned since start (1: nothing folded)."),
)


class Histogram:
    """A cumulative-bucket histogram; `observe` is O(log buckets)."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines.append(f"{self.name}_sum {_fmt(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """What the server measures itself: HTTP outcomes, token usage as reported, latencies."""

    def __init__(self) -> None:
        self.http_requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status)
        self.rejected_full = 0  # 503s for a full queue
        self.aborted = 0  # requests whose client went away before the end
        self.usage_prompt_tokens = 0
        self.usage_cached_tokens = 0
        self.usage_completion_tokens = 0
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first token, per prompt.", TTFT_BUCKETS
        )
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token, per prompt.", E2E_BUCKETS)

    def count_http(self, method: str, route: str, status: int) -> None:
        self.http_requests[(method, route, status)] += 1

    def render(self, engine_stats: dict[str, Any], pending: int, inflight: int) -> str:
        """The whole exposition: engine stats first, then the server's own series."""
        lines: list[str] = []
        for key, name, kind, help_text in _ENGINE_METRICS:
            value = engine_stats[key]
            _family(lines, PREFIX + name, kind, help_text, [("", value)])
        _family(lines, PREFIX + "pending_requests", "gauge", "Sequences admitted by the server and not finished.",
                [("", pending)])
        _family(lines, PREFIX + "http_inflight_requests", "gauge", "HTTP requests being handled.", [("", inflight)])
        _family(
            lines, PREFIX + "http_requests", "counter", "HTTP requests by method, route and status.",
            [(_labels(method=m, route=r, status=str(s)), n) for (m, r, s), n in sorted(self.http_requests.items())],
        )
        for name, value, help_text in (
            ("rejected_requests", self.rejected_full, "Requests refused with 503 because the queue was full."),
            ("aborted_requests", self.aborted, "Requests aborted because the client disconnected."),
            ("usage_prompt_tokens", self.usage_prompt_tokens, "Prompt tokens reported in responses' usage."),
            ("usage_cached_tokens", self.usage_cached_tokens, "Cached prompt tokens reported in responses' usage."),
            ("usage_completion_tokens", self.usage_completion_tokens, "Completion tokens reported in responses."),
        ):
            _family(lines, PREFIX + name, "counter", help_text, [("", value)])
        for hist in (self.ttft, self.itl, self.e2e):
            lines.extend(hist.render())
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    # Text format 0.0.4 names a counter family by its sample name (with _total), as prometheus_client does.
    if kind == "counter":
        name += "_total"
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{labels} {_fmt(value)}")


def _labels(**labels: str) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{labels}': value} (tests, the benchmark)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
