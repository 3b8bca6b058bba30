"""simulate(): replay a request stream through one CacheSim per (policy, capacity).

Two streaming passes over the trace. The first counts requests and the time
span (for ``warmup`` and the time windows) and, when Belady is asked for,
builds its NextUse table. The second feeds every request to all caches in
lockstep, so the file is parsed once per pass whatever the number of runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from radixserve.replay.belady import BeladySim, NextUse
from radixserve.replay.cache_sim import ONLINE_POLICIES, CacheSim, StepResult
from radixserve.replay.formats import TraceRequest
from radixserve.replay.keys import KeyWeights, request_key
from radixserve.replay.stats import RunStats

logger = logging.getLogger(__name__)

POLICIES = ONLINE_POLICIES + ("belady",)

RequestSource = Callable[[], Iterable[TraceRequest]] | Sequence[TraceRequest]


@dataclass(frozen=True)
class RunSpec:
    """One simulated cache: an eviction policy and a capacity in tokens (None: unlimited)."""

    policy: str
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        c = self.capacity
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"capacity must be a positive integer (tokens) or None, got {c!r}")


@dataclass(frozen=True)
class SimOptions:
    warmup: float = 0.0  # fraction of requests replayed before the figures start counting
    window_s: float | None = None  # hit-rate-over-time bin width; None: about 30 bins over the span
    # Engine accounting: cache the output's KV (output_length - 1 tokens that no
    # prompt reuses) and never count a prompt's last token as a hit, as the engine does.
    insert_output: bool = False
    compute_last: bool = False
    progress: bool = False
    check: bool = False  # verify the tree and the accounting after every request (slow; tests)

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.window_s is not None and not self.window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {self.window_s!r}")


@dataclass(frozen=True)
class SimResult:
    trace: dict[str, Any]  # requests, prompt tokens, span, warmup
    runs: list[dict[str, Any]]  # one per RunSpec, in order


def nice_window(span_s: float, bins: int = 30) -> float:
    """A round bin width (1, 2 or 5 times a power of ten seconds) giving about ``bins`` bins."""
    if span_s <= 0:
        return 1.0
    raw = span_s / bins
    base = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * base >= raw:
            return m * base
    return 10 * base


def _passes(source: RequestSource) -> Callable[[], Iterable[TraceRequest]]:
    return source if callable(source) else (lambda: source)


def _scan(requests: Iterable[TraceRequest], next_use: NextUse | None, insert_output: bool) -> dict[str, Any]:
    n = 0
    prompt = 0
    first = last = 0.0
    backwards = 0
    for req in requests:
        if n == 0:
            first = req.timestamp
        elif req.timestamp < last:
            backwards += 1
        last = req.timestamp
        n += 1
        prompt += req.input_length
        if next_use is not None:
            next_use.add(req.index, request_key(req, insert_output))
    if backwards:
        logger.warning("%d requests have a timestamp before their predecessor's; replaying in file order", backwards)
    return {"requests": n, "prompt_tokens": prompt, "t_first": first, "t_last": last, "span_s": last - first}


def make_sim(spec: RunSpec, next_use: NextUse | None, check: bool = False, compute_last: bool = False) -> CacheSim:
    if spec.policy == "belady":
        if next_use is None:
            raise ValueError("belady needs the NextUse table of the same requests")
        return BeladySim(spec.capacity, next_use, check, compute_last)
    return CacheSim(spec.policy, spec.capacity, check, compute_last)


def simulate(
    source: RequestSource,
    specs: Sequence[RunSpec],
    options: SimOptions = SimOptions(),
    observer: Callable[[int, TraceRequest, StepResult], None] | None = None,
) -> SimResult:
    """Replays ``source`` (a list, or a callable giving a fresh iterable per pass)
    through one cache per spec; returns the trace summary and one dict per run.
    ``observer(run_index, request, step_result)`` sees every request of every run."""
    if not specs:
        raise ValueError("specs must name at least one (policy, capacity) run")
    passes = _passes(source)
    next_use = NextUse() if any(s.policy == "belady" for s in specs) else None
    t_start = time.perf_counter()
    trace = _scan(passes(), next_use, options.insert_output)
    if next_use is not None:
        next_use.finish()
    trace["scan_s"] = time.perf_counter() - t_start
    n_warm = int(trace["requests"] * options.warmup)
    trace["warmup_requests"] = n_warm
    window = options.window_s or nice_window(trace["span_s"])

    sims = [make_sim(s, next_use, options.check, options.compute_last) for s in specs]
    stats = [RunStats(trace["t_first"], window) for _ in specs]
    walls = [0.0] * len(specs)
    base = [(0, 0)] * len(specs)  # evicted/inserted tokens when measuring starts
    bar = tqdm(total=trace["requests"], desc="replay", unit="req", disable=not options.progress)
    insert_output = options.insert_output
    clock = time.perf_counter
    for req in passes():
        key = request_key(req, insert_output)
        measured = req.index >= n_warm
        if req.index == n_warm:
            base = [(s.evicted_tokens, s.inserted_tokens) for s in sims]
        for k, sim in enumerate(sims):
            t0 = clock()
            r = sim.step(req, key, KeyWeights(req, key, insert_output))
            walls[k] += clock() - t0
            if observer is not None:
                observer(k, req, r)
            if measured:
                stats[k].record(req.timestamp, req.input_length, r.hit_tokens, req.tenant, req.session, req.turn,
                                r.same_session_tokens)
        bar.update(1)
    bar.close()
    runs = []
    for spec, sim, st, wall, (ev0, in0) in zip(specs, sims, stats, walls, base):
        runs.append({
            "policy": spec.policy,
            "capacity": spec.capacity,
            **st.as_dict(),
            "evicted_tokens": sim.evicted_tokens - ev0,
            "inserted_tokens": sim.inserted_tokens - in0,
            "peak_cached_tokens": sim.peak,
            "uncacheable_requests": sim.uncacheable,
            "sim_s": wall,
        })
    return SimResult(trace, runs)
