"""Load test of the HTTP server: the generated-shared-prefix workload, Poisson arrivals, streamed.

The workload is SGLang's "generated-shared-prefix" (`radixserve.replay.gentrace`):
`groups` x `prompts-per-group` requests, each prompt = its group's system
prompt (`system-len` random tokens) + a question (`question-len`), asking for
exactly `output-len` tokens (EOS ignored), arriving as a Poisson process of
`rate` requests per second. Prompts are token ids, sent as OpenAI
`/v1/completions` token-array prompts (or to the native `/generate`), streamed.

Each run prints one JSON line: TTFT, inter-token latency and end-to-end latency
percentiles (ms), throughput (requests/s, output and input tokens/s), and the
server's prefix-cache hit rate over the run (from /metrics).

Without --url it launches `radixserve serve` itself twice on the same
workload: with the engine's defaults, and with one feature off (`--baseline`:
`no-prefix-cache` by default, or `no-overlap-schedule`); the default run's
line also carries the ratios against the baseline's (everything else, e.g.
within-batch folding, stays at the engine's default in both):

    python benchmarks/serve_bench.py --device cpu                 # small defaults
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000  # an already running server
    python benchmarks/serve_bench.py --device cuda --groups 16 --prompts-per-group 32 --system-len 2048 \\
        --question-len 128 --output-len 256 --rate 32
    python benchmarks/serve_bench.py --device cuda --baseline no-overlap-schedule --route generate --model DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp

from radixserve.replay.gentrace import GenConfig, generate_trace
from radixserve.server.metrics import Scrape, parse_metrics


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99 and mean (nearest rank), times `scale` (ms by default)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * scale, 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": round(sum(ordered) / len(ordered) * scale, 3)}


async def one_request(session: aiohttp.ClientSession, url: str, route: str, model: str, ids: list[int],
                      output_len: int) -> dict[str, Any]:
    """Stream one request; returns its TTFT, token gaps, latency and usage."""
    if route == "generate":
        path, body = "/generate", {"input_ids": ids, "stream": True,
                                   "sampling_params": {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}}
    else:
        path, body = "/v1/completions", {"model": model, "prompt": ids, "max_tokens": output_len, "temperature": 0,
                                         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, Any] = {}
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {(await resp.text())[:200]}", "latency": time.perf_counter() - t0}
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if route == "generate":
                if event.get("token_ids"):
                    arrivals.append(time.perf_counter())
                usage = {"completion_tokens": event["completion_tokens"], "cached_tokens": event["cached_tokens"]}
            elif event.get("choices"):
                arrivals.append(time.perf_counter())
            elif event.get("usage"):
                u = event["usage"]
                usage = {"completion_tokens": u["completion_tokens"],
                         "cached_tokens": u["prompt_tokens_details"]["cached_tokens"]}
    end = time.perf_counter()
    return {
        "ttft": arrivals[0] - t0 if arrivals else None,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "latency": end - t0,
        "prompt_tokens": len(ids),
        **usage,
    }


async def run_workload(url: str, cfg: GenConfig, route: str) -> dict[str, Any]:
    trace = list(generate_trace(cfg))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        await one_request(session, url, route, model, list(range(1000, 1016)), 2)  # warm-up
        async with session.post(url + "/flush_cache") as resp:
            assert resp.status == 200, await resp.text()  # every run starts from an empty cache
        async with session.get(url + "/metrics") as resp:
            before = parse_metrics(await resp.text())

        async def at(rec: dict[str, Any], start: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + rec["timestamp"] - time.perf_counter()))
            return await one_request(session, url, route, model, rec["input_ids"], rec["output_len"])

        start = time.perf_counter()
        results = await asyncio.gather(*(at(rec, start) for rec in trace))
        wall = time.perf_counter() - start
        async with session.get(url + "/metrics") as resp:
            after = parse_metrics(await resp.text())
    last = max(rec["timestamp"] for rec in trace)
    return summarize(results, wall, before, after, round(len(trace) / last, 3) if last > 0 else None)


def summarize(results: list[dict[str, Any]], wall: float, before: Scrape,
              after: Scrape, offered_rate: float | None = None) -> dict[str, Any]:
    """The run's numbers; `offered_rate`: requests per second the trace sent (its last arrival
    over its count), against the served `request_throughput`."""
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r.get("completion_tokens", 0) for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)

    def moved(name: str) -> float:
        return after.get(name) - before.get(name)

    queried = moved("radixserve_prefix_cache_queried_tokens_total")
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if "error" in r), None),
        "wall_s": round(wall, 3),
        "ttft_ms": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_ms": percentiles([g for r in ok for g in r["gaps"]]),
        "e2e_ms": percentiles([r["latency"] for r in ok]),
        "request_throughput": round(len(ok) / wall, 3),
        "offered_rate": offered_rate,
        "output_tokens_per_s": round(out_tokens / wall, 2),
        "input_tokens_per_s": round(in_tokens / wall, 2),
        "cached_token_share": round(sum(r.get("cached_tokens", 0) for r in ok) / max(1, in_tokens), 4),
        "server_hit_rate": round(moved("radixserve_prefix_cache_hit_tokens_total") / queried, 4) if queried else 0.0,
        # The engine's steps over the run: decode graph replays, graph-piece (prefill, mixed)
        # steps, and the rest (eager); and the offered load, to tell a saturated server.
        "steps": {kind: int(moved(f"radixserve:{name}_total")) for kind, name in (
            ("all", "engine_steps"), ("decode_graph", "decode_graph_steps"), ("piecewise", "piecewise_graph_steps"))},
    }


def launch(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `radixserve serve --port 0 ...` and return it with the URL it prints."""
    cmd = [sys.executable, "-m", "radixserve", "serve", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r" at (http://\S+) ", line)
        if match:  # keep draining its output, or a chatty server would block on a full pipe
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError(f"`{' '.join(cmd)}` exited ({proc.wait()}) without serving")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running server (default: launch one per run)")
    p.add_argument("--route", choices=["completions", "generate"], default="completions")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--prompts-per-group", type=int, default=4)
    p.add_argument("--system-len", type=int, default=256)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="launched servers: model directory (default: built-in)")
    p.add_argument("--device", default=None, help="launched servers: cpu | cuda")
    p.add_argument("--max-running-requests", type=int, default=None, help="launched servers")
    p.add_argument("--baseline", choices=["no-prefix-cache", "no-overlap-schedule", "no-piecewise-graphs"],
                   default="no-prefix-cache",
                   help="launched servers: the feature the baseline server runs without")
    args = p.parse_args()
    cfg = GenConfig(groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_len,
                    question_len=args.question_len, output_len=args.output_len, rate=args.rate, seed=args.seed)
    common = {"workload": "generated-shared-prefix", "route": args.route, **{k: getattr(cfg, k) for k in (
        "groups", "prompts_per_group", "system_len", "question_len", "output_len", "rate", "seed")},
        "host": platform.node()}
    if args.url:
        print(json.dumps({**common, "server": args.url, **asyncio.run(run_workload(args.url, cfg, args.route))}))
        return
    extra: list[str] = []
    for flag, value in (("--model", args.model), ("--device", args.device),
                        ("--max-running-requests", args.max_running_requests)):
        if value is not None:
            extra += [flag, str(value)]
    # The default server's name says what the baseline lacks ("prefix-cache" against "no-prefix-cache").
    ours_name = args.baseline.removeprefix("no-")
    runs = {}
    for name, flags in ((args.baseline, [f"--{args.baseline}"]), (ours_name, [])):
        proc, url = launch(extra + flags)
        try:
            runs[name] = asyncio.run(run_workload(url, cfg, args.route))
        finally:
            stop(proc)
    base, ours = runs[args.baseline], runs[ours_name]
    print(json.dumps({**common, "server": args.baseline, "args": extra, **base}))
    ratios = {
        "ttft_p50_speedup": _ratio(base["ttft_ms"]["p50"], ours["ttft_ms"]["p50"]),
        "itl_p50_speedup": _ratio(base["itl_ms"]["p50"], ours["itl_ms"]["p50"]),
        "e2e_p50_speedup": _ratio(base["e2e_ms"]["p50"], ours["e2e_ms"]["p50"]),
        "output_throughput_ratio": _ratio(ours["output_tokens_per_s"], base["output_tokens_per_s"]),
    }
    key = "vs_" + args.baseline.replace("-", "_")
    print(json.dumps({**common, "server": ours_name, "args": extra, **ours, key: ratios}))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    main()
