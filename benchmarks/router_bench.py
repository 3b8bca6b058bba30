"""The router's cost and what it buys (CPU, no GPU, no model).

overhead  the latency `radixserve router` adds to a request. A stand-in replica (an aiohttp
          server in its own process that answers /v1/completions at once with a fixed
          completion, or a short event stream) isolates the router: the same requests go to
          the stand-in directly and through the router (its own process, `cache_aware` by
          default, so every request is keyed and matched against the approximate trees),
          interleaved one by one over keep-alive connections. Reported: the median and p99
          latency of each path and their differences (the added latency).
memory    the memory of one replica's approximate tree (the router keeps one per replica)
          filled to its bound with prompts of shared heads and own tails, measured with
          tracemalloc: bytes per key element (an element is three characters, about a token).
hitrate   the cluster's prefix-cache hit rate on a trace by routing policy, simulated
          (`replay --replicas`'s cluster simulation: each replica the engine's radix tree at
          its capacity), beside one cache of all the replicas' tokens.

Prints a table per part and one JSON line. Usage:
  python benchmarks/router_bench.py                     # every part
  python benchmarks/router_bench.py --part overhead --requests 2000 --stream
  python benchmarks/router_bench.py --part hitrate --trace /work/shared/traces/conversation_trace.jsonl \\
      --replicas 4 --capacity 1M
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRACE_CANDIDATES = [ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl",
                    Path("/work/shared/traces/conversation_trace.jsonl"),
                    ROOT / "tests" / "data" / "conversation_trace_500.jsonl"]

STAND_IN = r"""
import asyncio, json, sys, time
from aiohttp import web

ANSWER = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "stand-in",
          "choices": [{"index": 0, "text": " a fixed answer", "logprobs": None, "finish_reason": "length"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}}

async def completions(request):
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(ANSWER)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for word in (" a", " fixed", " answer"):
        chunk = dict(ANSWER, choices=[{"index": 0, "text": word, "logprobs": None, "finish_reason": None}])
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp

async def health(request):
    return web.json_response({"status": "ok"})

app = web.Application(client_max_size=64 * 2**20)
app.router.add_post("/v1/completions", completions)
app.router.add_get("/health", health)

async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"stand-in at http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _tokens(text: str) -> int:
    scale = {"k": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _start(cmd: list[str], pattern: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("did not start:\n" + "".join(seen[-30:]))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _prompts(n: int, chars: int, groups: int, seed: int) -> list[str]:
    """Prompts of about `chars` characters: `groups` shared heads (3/4 of the prompt), own tails."""
    rng = random.Random(seed)
    words = ["ship", "port", "crane", "cargo", "berth", "tide", "manifest", "harbor", "vessel", "dock"]
    heads = [" ".join(rng.choice(words) for _ in range(chars * 3 // 4 // 6)) for _ in range(groups)]
    return [f"{rng.choice(heads)} {i}: " + " ".join(rng.choice(words) for _ in range(chars // 4 // 6))
            for i in range(n)]


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stand_in, replica = (None, args.replica) if args.replica else _start(
        [sys.executable, "-c", STAND_IN], r"stand-in at (http://\S+)")
    try:
        router, url = _start([sys.executable, "-m", "radixserve", "router", "--replica", replica, "--port", "0",
                              "--policy", args.policy], r"routing at (http://\S+)", env)
        try:
            return _measure(args, replica, url)
        finally:
            _stop(router)
    finally:
        if stand_in is not None:
            _stop(stand_in)


def _measure(args: argparse.Namespace, replica: str, router: str) -> dict[str, Any]:
    conns = {}
    for name, base in (("direct", replica), ("router", router)):
        u = urllib.parse.urlsplit(base)
        conns[name] = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    prompts = _prompts(args.requests + args.warmup, args.prompt_chars, args.groups, seed=0)
    times: dict[str, list[float]] = {"direct": [], "router": []}
    for i, prompt in enumerate(prompts):
        body = json.dumps({"model": args.model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                           "stream": args.stream}).encode()
        order = ("direct", "router") if i % 2 == 0 else ("router", "direct")  # interleaved, alternating first
        for name in order:
            conn = conns[name]
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            elapsed = time.perf_counter() - t
            if resp.status != 200 or (args.stream and not payload.rstrip().endswith(b"data: [DONE]")):
                raise RuntimeError(f"{name}: {resp.status} {payload[:300]!r}")
            if i >= args.warmup:
                times[name].append(elapsed)
    for conn in conns.values():
        conn.close()
    ms = {name: [t * 1e3 for t in ts] for name, ts in times.items()}
    out: dict[str, Any] = {"requests": args.requests, "prompt_chars": args.prompt_chars, "stream": args.stream,
                           "policy": args.policy, "replica": "given" if args.replica else "stand-in"}
    for name, xs in ms.items():
        out[f"{name}_p50_ms"] = round(statistics.median(xs), 3)
        out[f"{name}_p99_ms"] = round(_pct(xs, 0.99), 3)
    out["added_p50_ms"] = round(out["router_p50_ms"] - out["direct_p50_ms"], 3)
    out["added_p99_ms"] = round(out["router_p99_ms"] - out["direct_p99_ms"], 3)
    pairs = [r - d for r, d in zip(ms["router"], ms["direct"])]
    out["added_paired_p50_ms"] = round(statistics.median(pairs), 3)
    return out


def memory(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    from radixserve.router.keys import text_key
    from radixserve.router.policy import ApproxTree

    bound = _tokens(args.tree_tokens)
    prompts = _prompts(4 * bound * 3 // args.prompt_chars + 1, args.prompt_chars, max(1, bound // 20_000), seed=1)
    keys = [text_key(p) for p in prompts]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = ApproxTree(bound)
    t = time.perf_counter()
    for key in keys:
        tree.insert(key)
    wall = time.perf_counter() - t
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"bound": bound, "elements": tree.size, "nodes": tree.tree.num_nodes, "prompts": len(keys),
            "bytes": used, "bytes_per_element": round(used / tree.size, 1),
            "insert_us": round(wall / len(keys) * 1e6, 1)}


def hitrate(args: argparse.Namespace) -> dict[str, Any]:
    from radixserve.replay.cluster import ClusterSpec, simulate_cluster
    from radixserve.replay.formats import TraceReader
    from radixserve.replay.simulate import RunSpec, simulate

    trace = Path(args.trace) if args.trace else next(p for p in TRACE_CANDIDATES if p.exists())
    requests = list(TraceReader(str(trace)))
    capacity = _tokens(args.capacity)
    t = time.perf_counter()
    specs = [ClusterSpec(args.replicas, route, capacity) for route in args.routes]
    runs = simulate_cluster(requests, specs)
    one = simulate(requests, [RunSpec("lru", capacity * args.replicas)]).runs[0]
    wall = time.perf_counter() - t
    return {
        "trace": trace.name, "requests": len(requests), "replicas": args.replicas, "capacity": capacity,
        "one_cache_hit_rate": round(one["token_hit_rate"], 4),
        "routes": {r["route"]: {"hit_rate": round(r["token_hit_rate"], 4),
                                "busiest_share": round(r["max_request_share"], 4)} for r in runs},
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["overhead", "memory", "hitrate", "all"], default="all")
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per path (overhead)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--prompt-chars", type=int, default=2000, help="prompt length in characters (about /4 tokens)")
    ap.add_argument("--groups", type=int, default=8, help="shared prompt heads the requests draw from")
    ap.add_argument("--stream", action="store_true", help="stream the answers (4 events)")
    ap.add_argument("--policy", default="cache_aware", choices=["cache_aware", "round_robin", "least_load"])
    ap.add_argument("--replica", help="a running replica's URL instead of the stand-in")
    ap.add_argument("--model", default="stand-in", help="the model name sent (with --replica)")
    ap.add_argument("--tree-tokens", default="1M", help="the approximate tree's bound (memory)")
    ap.add_argument("--trace", help="trace for the hit-rate part (default: the Mooncake conversation trace)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--capacity", default="1M", help="tokens of each replica's cache (hitrate)")
    ap.add_argument("--routes", nargs="+", default=["cache_aware", "round_robin", "least_load"])
    args = ap.parse_args()
    result: dict[str, Any] = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                              "python": platform.python_version()}
    if args.part in ("overhead", "all"):
        o = result["overhead"] = overhead(args)
        print(f"router overhead ({o['replica']} replica, {o['policy']}, {o['requests']} requests a path, "
              f"{o['prompt_chars']}-character prompts, {'streamed' if o['stream'] else 'JSON'}):")
        print(f"  {'path':<8} {'p50 ms':>8} {'p99 ms':>8}")
        for name in ("direct", "router"):
            print(f"  {name:<8} {o[name + '_p50_ms']:>8.3f} {o[name + '_p99_ms']:>8.3f}")
        print(f"  {'added':<8} {o['added_p50_ms']:>8.3f} {o['added_p99_ms']:>8.3f}"
              f"   (median of paired differences {o['added_paired_p50_ms']:.3f} ms)")
    if args.part in ("memory", "all"):
        m = result["memory"] = memory(args)
        print(f"approximate tree at its bound of {m['bound']:,} elements: {m['elements']:,} elements in "
              f"{m['nodes']:,} nodes, {m['bytes'] / 2**20:.1f} MiB ({m['bytes_per_element']} bytes an element); "
              f"{m['insert_us']} us an insert of {args.prompt_chars} characters")
    if args.part in ("hitrate", "all"):
        h = result["hitrate"] = hitrate(args)
        print(f"cluster hit rate ({h['trace']}, {h['requests']} requests, {h['replicas']} replicas of "
              f"{h['capacity']:,} tokens; one cache of {h['replicas'] * h['capacity']:,}: "
              f"{h['one_cache_hit_rate']:.2%}; {h['wall_s']} s):")
        for route, r in h["routes"].items():
            print(f"  {route:<12} hit rate {r['hit_rate']:7.2%}  busiest replica {r['busiest_share']:6.1%}"
                  f"  ({r['hit_rate'] / h['one_cache_hit_rate']:.0%} of one cache)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
