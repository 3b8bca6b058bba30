"""Trace replay speed and memory (simulate mode, one CPU core, no GPU).

Measures, each in a fresh subprocess (wall time and peak RSS):
  parse     reading the trace only (the baseline the others are a ratio of)
  one       LRU at one capacity
  sweep     LRU and Belady at 8 capacities (16 runs in one replay)
  mem-1x / mem-4x   LRU at one capacity on the trace and on it repeated 4 times:
            peak RSS must not grow with the trace's length

Prints one JSON line. Usage:
  python benchmarks/replay_bench.py [--trace ../shared/traces/conversation_trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
SWEEP = ["250k", "500k", "1M", "2M", "4M", "8M", "16M", "32M"]

CHILD = r"""
import json, resource, sys, time
from radixserve.replay.formats import TraceReader
from radixserve.replay.simulate import RunSpec, SimOptions, simulate
path, mode, caps, policies = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
reader = TraceReader(path)
t = time.perf_counter()
if mode == "parse":
    n = sum(1 for _ in reader)
    out = {"requests": n}
else:
    res = simulate(lambda: iter(reader), [RunSpec(p, c) for p in policies for c in caps], SimOptions())
    out = {"hit_rates": {f"{r['policy']}@{r['capacity']}": round(r["token_hit_rate"], 4) for r in res.runs}}
out["wall_s"] = time.perf_counter() - t
out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _tokens(text: str) -> int:
    scale = {"k": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("kM")) * scale)


def child(trace: Path, mode: str, caps: list[int | None], policies: list[str]) -> dict:
    # taskset keeps the replay on one core, as the target says.
    cmd = [sys.executable, "-c", CHILD, str(trace), mode, json.dumps(caps), json.dumps(policies)]
    if os.path.exists("/usr/bin/taskset"):
        cmd = ["taskset", "-c", "0"] + cmd
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t  # including interpreter start and imports
    return out


def repeated(trace: Path, times: int, out: Path) -> Path:
    """The trace ``times`` times over, each copy after the previous in time and with its
    own hash ids, so the repeats do not share prefixes with each other."""
    lines = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    span = lines[-1]["timestamp"] + 1
    shift = 1 + max(max(r["hash_ids"]) for r in lines)
    with open(out, "w") as f:
        for k in range(times):
            for r in lines:
                f.write(json.dumps({**r, "timestamp": r["timestamp"] + k * span,
                                    "hash_ids": [h + k * shift for h in r["hash_ids"]]}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--capacity", default="4M", help="capacity of the single-run and memory measurements")
    args = ap.parse_args()
    cap = _tokens(args.capacity)
    sweep = [_tokens(c) for c in SWEEP]
    result: dict = {"bench": "replay", "trace": args.trace.name, "machine": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "cores_used": 1}
    result["parse"] = child(args.trace, "parse", [], [])
    result["one"] = child(args.trace, "sim", [cap], ["lru"])
    result["sweep"] = child(args.trace, "sim", sweep, ["lru", "belady"])
    with tempfile.TemporaryDirectory() as tmp:
        big = repeated(args.trace, 4, Path(tmp) / "x4.jsonl")
        result["mem_1x"] = child(args.trace, "sim", [cap], ["lru"])
        result["mem_4x"] = child(big, "sim", [cap], ["lru"])
    base = result["parse"]["wall_s"]
    result["ratios_vs_parse"] = {k: round(result[k]["wall_s"] / base, 2) for k in ("one", "sweep")}
    result["rss_growth_4x_trace"] = round(result["mem_4x"]["max_rss_mb"] / result["mem_1x"]["max_rss_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
