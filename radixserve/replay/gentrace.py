"""gen-trace: synthetic shared-prefix workloads in the token-level JSONL format.

Sessions belong to groups; every prompt of a group starts with the group's
system prompt. A session has ``turns`` turns; turn t's prompt is

    system + question_1 + answer_1 + ... + question_t

(the answers stand for what the model said; the request asks for
``output_len`` new tokens). Sessions start as a Poisson process of ``rate``
per second and each next turn comes ``think_time`` seconds later. With
``zipf`` = 0 every group gets ``prompts_per_group`` sessions; with ``zipf`` =
s > 0 each session's group is drawn with probability proportional to
1 / rank^s, so a few groups are hot.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radixserve.replay.content import DEFAULT_TOKEN_RANGE


@dataclass(frozen=True)
class GenConfig:
    groups: int = 8
    prompts_per_group: int = 16  # sessions per group (on average when zipf > 0)
    system_len: int = 1024
    question_len: int = 128
    output_len: int = 128
    turns: int = 1
    zipf: float = 0.0
    rate: float = 1.0  # sessions started per second
    think_time: float = 10.0  # seconds between a session's turns
    tenants: int = 0  # > 0: group g belongs to tenant "tenant-{g % tenants}"
    length_jitter: float = 0.0  # question/output lengths uniform in L * [1 - j, 1 + j]
    seed: int = 0
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE

    def __post_init__(self) -> None:
        for name, low in (("groups", 1), ("prompts_per_group", 1), ("system_len", 0), ("question_len", 1),
                          ("output_len", 1), ("turns", 1), ("tenants", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not self.zipf >= 0:
            raise ValueError(f"zipf must be >= 0, got {self.zipf!r}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 sessions per second, got {self.rate!r}")
        if not self.think_time >= 0:
            raise ValueError(f"think_time must be >= 0 seconds, got {self.think_time!r}")
        if not 0 <= self.length_jitter < 1:
            raise ValueError(f"length_jitter must be in [0, 1), got {self.length_jitter!r}")
        low, high = self.token_range
        if not 0 <= low < high:
            raise ValueError(f"token_range must be (low, high) with 0 <= low < high, got {self.token_range!r}")


def generate_trace(cfg: GenConfig) -> Iterator[dict[str, Any]]:
    """The trace's records in timestamp order."""
    rng = np.random.default_rng(cfg.seed)
    low, high = cfg.token_range

    def tokens(n: int) -> list[int]:
        return rng.integers(low, high, size=n).tolist()

    def length(mean: int) -> int:
        j = cfg.length_jitter
        return max(1, int(round(mean * rng.uniform(1 - j, 1 + j)))) if j else mean

    systems = [tokens(cfg.system_len) for _ in range(cfg.groups)]
    n_sessions = cfg.groups * cfg.prompts_per_group
    if cfg.zipf > 0:
        weights = 1.0 / np.arange(1, cfg.groups + 1) ** cfg.zipf
        group_of = rng.choice(cfg.groups, size=n_sessions, p=weights / weights.sum())
    else:
        group_of = rng.permutation(np.repeat(np.arange(cfg.groups), cfg.prompts_per_group))
    starts = np.cumsum(rng.exponential(1.0 / cfg.rate, size=n_sessions))
    # Turns of different sessions interleave: merge them by time with a heap.
    heap = [(float(starts[s]), s, 1) for s in range(n_sessions)]
    heapq.heapify(heap)
    history: dict[int, list[int]] = {}
    while heap:
        t, s, turn = heapq.heappop(heap)
        g = int(group_of[s])
        prompt = history.pop(s, None) or list(systems[g])
        prompt += tokens(length(cfg.question_len))
        out_len = length(cfg.output_len)
        rec: dict[str, Any] = {"timestamp": round(t, 3), "input_ids": prompt, "output_len": out_len,
                               "session": f"s{s}", "turn": turn}
        if cfg.tenants:
            rec["tenant"] = f"tenant-{g % cfg.tenants}"
        yield rec
        if turn < cfg.turns:
            history[s] = prompt + tokens(out_len)
            heapq.heappush(heap, (t + cfg.think_time, s, turn + 1))


def write_trace(cfg: GenConfig, path: str | Path) -> int:
    """Writes the trace as JSONL; returns the number of requests."""
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in generate_trace(cfg):
            f.write(json.dumps(rec, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n
