"""Live replay: send a trace's requests to an engine at their timestamps.

Requests go out at ``timestamp * time_scale`` seconds after the start (0: all
at once), at most ``max_concurrency`` in flight. Hash-id prompts become token
ids through content.prompt_token_ids, so the engine sees the trace's prefix
structure. Every request asks for exactly its ``output_length`` tokens
(greedy, EOS ignored). Per request we record TTFT, latency and the engine's
``cached_tokens``; the same requests are then simulated at the engine's KV
capacity with the engine's accounting, so the two hit rates can be compared.

Targets: ``EngineTarget`` (an in-process ``radixserve.Engine``) and
``HttpTarget`` (``POST {url}/generate`` with ``{"input_ids", "sampling_params",
"stream": true}``, reading ``data: {...}`` lines up to ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from radixserve.replay.content import DEFAULT_TOKEN_RANGE, prompt_token_ids
from radixserve.replay.formats import TraceRequest
from radixserve.replay.simulate import RunSpec, SimOptions, simulate
from radixserve.replay.stats import RunStats, quantile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sent:
    """What one request saw."""

    ttft_s: float | None
    latency_s: float
    cached_tokens: int
    output_tokens: int
    error: str | None = None


class Target(Protocol):
    name: str

    async def send(self, prompt: list[int], max_tokens: int) -> Sent: ...


class EngineTarget:
    """An in-process engine, driven through ``generate_async``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = f"engine {getattr(engine, 'model_path', '')}".strip()

    async def send(self, prompt: list[int], max_tokens: int) -> Sent:
        from radixserve.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        t0 = time.perf_counter()
        ttft = None
        cached = n_out = 0
        async for delta in self.engine.generate_async(prompt, params):
            if delta.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            n_out += len(delta.token_ids)
            cached = delta.cached_tokens
        return Sent(ttft, time.perf_counter() - t0, cached, n_out)


class HttpTarget:
    """A running server's ``/generate`` endpoint, streamed."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/generate"
        self.name = self.url
        self._session: Any = None

    async def send(self, prompt: list[int], max_tokens: int) -> Sent:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        payload = {
            "input_ids": prompt,
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
            "stream": True,
        }
        t0 = time.perf_counter()
        ttft = None
        cached = n_out = 0
        async with self._session.post(self.url, json=payload) as resp:
            if resp.status != 200:
                return Sent(None, time.perf_counter() - t0, 0, 0, f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith("data:"):
                    line = line[5:].strip()
                if not line:
                    continue
                if line == "[DONE]":
                    break
                chunk = json.loads(line)
                meta = chunk.get("meta_info", chunk)
                got = len(chunk.get("token_ids") or ()) or (1 if chunk.get("text") else 0)
                if got and ttft is None:
                    ttft = time.perf_counter() - t0
                n_out = meta.get("completion_tokens", n_out + got)
                cached = meta.get("cached_tokens", cached)
        return Sent(ttft, time.perf_counter() - t0, cached, n_out)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class LiveOptions:
    time_scale: float = 1.0  # send at timestamp * time_scale; 0 sends everything at once
    max_concurrency: int = 16
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.time_scale >= 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale!r}")
        mc = self.max_concurrency
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {self.max_concurrency!r}")


async def replay_live(
    requests: Sequence[TraceRequest], target: Target, options: LiveOptions = LiveOptions()
) -> dict[str, Any]:
    """Sends ``requests`` to ``target``; returns the live figures and one record per request."""
    sem = asyncio.Semaphore(options.max_concurrency)
    results: list[dict[str, Any] | None] = [None] * len(requests)
    t0_trace = requests[0].timestamp if requests else 0.0
    bar = tqdm(total=len(requests), desc="live replay", unit="req", disable=not options.progress)

    async def one(k: int, req: TraceRequest, due: float) -> None:
        prompt = prompt_token_ids(req, options.token_range, options.seed)
        async with sem:
            start = time.perf_counter()
            try:
                sent = await target.send(prompt, max(1, req.output_length))
            except Exception as exc:  # one failed request must not end the replay
                logger.warning("request %d (line %d) failed: %s", req.index, req.line, exc)
                sent = Sent(None, time.perf_counter() - start, 0, 0, repr(exc))
        results[k] = {
            "index": req.index, "prompt_tokens": len(prompt), "cached_tokens": sent.cached_tokens,
            "output_tokens": sent.output_tokens, "ttft_s": sent.ttft_s, "latency_s": sent.latency_s,
            "send_delay_s": start - due, "error": sent.error,
        }
        bar.update(1)

    started = time.perf_counter()
    tasks = []
    for k, req in enumerate(requests):
        due = started + (req.timestamp - t0_trace) * options.time_scale
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(k, req, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    bar.close()
    if isinstance(target, HttpTarget):
        await target.close()
    return summarize_live(requests, [r for r in results if r is not None], target.name, wall)


def summarize_live(
    requests: Sequence[TraceRequest], records: list[dict[str, Any]], name: str, wall: float
) -> dict[str, Any]:
    ok = [r for r in records if r["error"] is None]
    stats = RunStats(requests[0].timestamp if requests else 0.0)
    by_index = {req.index: req for req in requests}
    for r in ok:
        req = by_index[r["index"]]
        stats.record(req.timestamp, r["prompt_tokens"], r["cached_tokens"], req.tenant)
    figures = stats.as_dict()
    ttfts = Counter(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    lats = Counter(r["latency_s"] for r in ok)
    return {
        "target": name,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "wall_s": wall,
        "token_hit_rate": figures["token_hit_rate"],
        "prompt_tokens": figures["prompt_tokens"],
        "hit_tokens": figures["hit_tokens"],
        "requests_with_hit": figures["requests_with_hit"],
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p99_s": quantile(ttfts, 0.99),
        "latency_p50_s": quantile(lats, 0.5), "latency_p99_s": quantile(lats, 0.99),
        "per_request": records,
    }


def compare_with_simulation(
    requests: Sequence[TraceRequest], live: dict[str, Any], capacity: int, policy: str = "lru"
) -> dict[str, Any]:
    """Adds to ``live`` the simulated figures of the same requests at the engine's
    capacity, counted as the engine counts (outputs cached, last prompt token
    always computed), and the share of requests whose cached_tokens agree."""
    simulated: dict[int, int] = {}
    result = simulate(
        requests, [RunSpec(policy, capacity)], SimOptions(insert_output=True, compute_last=True),
        observer=lambda k, req, r: simulated.__setitem__(req.index, r.hit_tokens),
    )
    run = result.runs[0]
    ok = [r for r in live["per_request"] if r["error"] is None]
    same = sum(r["cached_tokens"] == simulated.get(r["index"]) for r in ok)
    live["kv_capacity_tokens"] = capacity
    live["simulated"] = {
        "policy": policy,
        "capacity": capacity,
        "token_hit_rate": run["token_hit_rate"],
        "hit_tokens": run["hit_tokens"],
        "requests_with_same_cached_tokens": same / len(ok) if ok else 0.0,
    }
    for r in live["per_request"]:
        r["simulated_cached_tokens"] = simulated.get(r["index"])
    return live
