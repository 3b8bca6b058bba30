"""The replay report: a JSON document and a plain-text table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPARK = " ▁▂▃▄▅▆▇█"


def fmt_tokens(n: float | None) -> str:
    """1234567 -> '1.2M'; None -> 'unlimited'."""
    if n is None:
        return "unlimited"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size * 0.9995:  # 999_990 shows as 1.0M, not 1000k
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def fmt_duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def run_label(run: dict[str, Any]) -> str:
    return f"{run['policy']}@{fmt_tokens(run['capacity'])}"


def build_report(
    trace: dict[str, Any], runs: list[dict[str, Any]], live: dict[str, Any] | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {"trace": trace, "runs": runs}
    if live is not None:
        doc["live"] = live
    return doc


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def sparkline(values: list[float]) -> str:
    """One character per value in [0, 1]: blank for 0, then eight levels."""
    top = len(SPARK) - 1
    return "".join(SPARK[0] if v <= 0 else SPARK[min(top, 1 + int(v * top))] for v in values)


def format_trace(trace: dict[str, Any]) -> str:
    what = trace.get("format", "trace")
    if trace.get("block_size", 1) > 1:
        what += f", blocks of {trace['block_size']} tokens"
    text = (
        f"trace {trace.get('path', '')} ({what}): {trace['requests']:,} requests, "
        f"{fmt_tokens(trace['prompt_tokens'])} prompt tokens over {fmt_duration(trace['span_s'])}"
    )
    if trace.get("skipped_lines"):
        text += f"; {trace['skipped_lines']} malformed lines skipped"
    if trace.get("warmup_requests"):
        text += f"; first {trace['warmup_requests']:,} requests are warmup, not counted"
    return text


def format_report(doc: dict[str, Any]) -> str:
    """The terminal report: one row per run, then per-group, per-turn and session splits."""
    runs = doc["runs"]
    out = [format_trace(doc["trace"]), ""]
    rows = [
        [
            r["policy"], fmt_tokens(r["capacity"]), f"{100 * r['token_hit_rate']:.2f}%",
            f"{100 * r['requests_with_hit']:.1f}%", fmt_tokens(r["cached_tokens_mean"]),
            fmt_tokens(r["cached_tokens_p50"]), fmt_tokens(r["cached_tokens_p99"]),
            fmt_tokens(r["evicted_tokens"]), fmt_tokens(r["peak_cached_tokens"]),
        ]
        for r in runs
    ]
    out += _table(
        ["policy", "capacity", "hit rate", "req w/ hit", "cached mean", "p50", "p99", "evicted", "peak cached"], rows
    )
    labels = [run_label(r) for r in runs]
    for section, title in (("groups", "tenant / type"), ("turns", "turn")):
        keys = sorted({k for r in runs for k in r.get(section, {})}, key=lambda k: (len(k), k))
        if keys:
            rows = [[k] + [
                f"{100 * r[section][k]['token_hit_rate']:.1f}%" if k in r.get(section, {}) else "-" for r in runs
            ] for k in keys]
            out += ["", f"hit rate by {title}:"] + _table([title, *labels], rows)
    if any("sessions" in r for r in runs):
        rows = [[
            run_label(r), fmt_tokens(r["sessions"]["same_session_hit_tokens"]),
            fmt_tokens(r["sessions"]["cross_session_hit_tokens"]), f"{100 * r['sessions']['same_session_share']:.1f}%",
        ] for r in runs if "sessions" in r]
        out += ["", "hit tokens by where the cached copy came from:"]
        out += _table(["run", "same session", "other sessions", "same share"], rows)
    out += ["", f"hit rate over time ({fmt_duration(runs[0]['window_s'])} windows, 0-100%):"]
    width = max(len(label) for label in labels)
    for label, r in zip(labels, runs):
        rates = [w["token_hit_rate"] for w in r["windows"]]
        lo, hi = (min(rates), max(rates)) if rates else (0.0, 0.0)
        out.append(f"  {label.ljust(width)}  {sparkline(rates)}  min {100 * lo:.1f}%  max {100 * hi:.1f}%")
    if "cluster" in doc:
        out += ["", format_cluster(doc["cluster"], runs)]
    if "live" in doc:
        out += ["", format_live(doc["live"])]
    return "\n".join(out)


def format_cluster(cluster: list[dict[str, Any]], single: list[dict[str, Any]]) -> str:
    """Each cluster run beside one cache of the cluster's total size (a run of the main table)."""
    alone = {(r["policy"], r["capacity"]): r["token_hit_rate"] for r in single}
    rows = []
    for c in cluster:
        one = alone.get((c["policy"], c["total_capacity"]))
        rows.append([
            c["route"], str(c["replicas"]), c["policy"], fmt_tokens(c["capacity"]), f"{100 * c['token_hit_rate']:.2f}%",
            "-" if one is None else f"{100 * one:.2f}%", f"{100 * c['max_request_share']:.1f}%",
            str(c["peak_inflight"]),
        ])
    header = ["route", "replicas", "policy", "each", "hit rate", "one cache", "busiest share", "peak in flight"]
    return "\n".join(["replicas behind a router (one cache: a single cache of all the replicas' tokens):",
                      *_table(header, rows)])


def format_live(live: dict[str, Any]) -> str:
    sim = live.get("simulated", {})
    lines = [
        f"live replay ({live['target']}): {live['requests']:,} requests, {live['failed']} failed, "
        f"{live['wall_s']:.1f} s",
        f"  token hit rate  live {100 * live['token_hit_rate']:.2f}%   simulated lru at the engine's "
        f"{fmt_tokens(live.get('kv_capacity_tokens'))} tokens {100 * sim.get('token_hit_rate', 0.0):.2f}%",
        f"  TTFT    p50 {1000 * live['ttft_p50_s']:.1f} ms  p99 {1000 * live['ttft_p99_s']:.1f} ms",
        f"  latency p50 {1000 * live['latency_p50_s']:.1f} ms  p99 {1000 * live['latency_p99_s']:.1f} ms",
    ]
    return "\n".join(lines)
