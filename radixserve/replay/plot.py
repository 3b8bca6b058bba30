"""PNG plots of a replay report (matplotlib, imported only here)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from radixserve.replay.report import fmt_tokens, run_label

logger = logging.getLogger(__name__)

MAX_TIME_LINES = 8
_STYLES = {"lru": "-", "lfu": "-.", "fifo": ":", "priority": (0, (5, 1, 1, 1)), "belady": "--"}
_MARKERS = {"lru": "o", "lfu": "^", "fifo": "v", "priority": "D", "belady": "s"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'radixserve[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Writes replay_capacity.png (when some run has a finite capacity) and
    replay_time.png into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r["capacity"] is not None for r in doc["runs"]):
        written.append(plot_capacity(doc, out / "replay_capacity.png"))
    else:
        logger.info("no finite capacity among the runs: skipping the hit rate vs capacity plot")
    written.append(plot_time(doc, out / "replay_time.png"))
    return written


def _title(doc: dict[str, Any]) -> str:
    return Path(doc["trace"].get("path", "trace")).name


def plot_capacity(doc: dict[str, Any], path: Path) -> Path:
    """Token hit rate against capacity (log axis), a line per policy; the
    unlimited-capacity hit rate as a dotted ceiling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    policies = list(dict.fromkeys(r["policy"] for r in doc["runs"]))
    for policy in policies:
        pts = sorted((r["capacity"], r["token_hit_rate"]) for r in doc["runs"]
                     if r["policy"] == policy and r["capacity"] is not None)
        if not pts:
            continue
        xs, ys = zip(*pts)
        style: dict[str, Any] = dict(linestyle=_STYLES[policy], marker=_MARKERS[policy], markerfacecolor="none")
        if policy == "belady":
            style.update(color="black", markerfacecolor="black")
        label = "belady (offline optimum)" if policy == "belady" else policy
        ax.plot(xs, [100 * y for y in ys], label=label, **style)
    ceiling = [r["token_hit_rate"] for r in doc["runs"] if r["capacity"] is None]
    if ceiling:
        ax.axhline(100 * max(ceiling), color="gray", linestyle=":", label="unlimited capacity")
    ax.set_xscale("log")
    ticks = sorted({r["capacity"] for r in doc["runs"] if r["capacity"] is not None})
    ax.set_xticks(ticks)
    ax.set_xticklabels([fmt_tokens(t) for t in ticks], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("cache capacity (tokens)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{_title(doc)}: prefix-cache hit rate vs capacity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All runs if few; else the runs at the smallest, middle and largest capacity."""
    if len(runs) <= MAX_TIME_LINES:
        return runs
    caps = sorted({r["capacity"] for r in runs}, key=lambda c: (c is None, c or 0))
    keep = {caps[0], caps[(len(caps) - 1) // 2], caps[-1]}
    return [r for r in runs if r["capacity"] in keep]


def plot_time(doc: dict[str, Any], path: Path) -> Path:
    """Token hit rate per time window, a line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    t0 = doc["trace"].get("t_first", 0.0)
    runs = _time_runs(doc["runs"])
    # Colour by capacity, line style by policy, so a policy's curves and a
    # capacity's curves can each be followed.
    capacities = list(dict.fromkeys(r["capacity"] for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in runs:
        ws = run["windows"]
        xs = [(w["t_start"] - t0 + run["window_s"] / 2) / 60 for w in ws]
        color = colors[capacities.index(run["capacity"]) % len(colors)]
        ax.plot(xs, [100 * w["token_hit_rate"] for w in ws], label=run_label(run), color=color,
                linestyle=_STYLES.get(run["policy"], "-"))
    ax.set_xlabel("trace time (minutes)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{_title(doc)}: hit rate over time ({doc['runs'][0]['window_s']:g} s windows)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
