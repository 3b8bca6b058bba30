"""RunStats: the figures of one simulated (or live) run, in memory bounded by
the trace's shape (windows, tenants, turns, distinct cached-token counts),
never by its number of requests."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

MAX_TURN = 10  # turns >= this share one bucket


def quantile(hist: Counter, q: float) -> Any:
    """Nearest-rank q-quantile of the values counted in ``hist`` (0 when empty)."""
    total = sum(hist.values())
    if not total:
        return 0
    rank = max(1, math.ceil(q * total - 1e-9))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist)


def _rate(hit: int, prompt: int) -> float:
    return hit / prompt if prompt else 0.0


class _Tally:
    __slots__ = ("requests", "prompt_tokens", "hit_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def add(self, prompt: int, hit: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.hit_tokens += hit

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "token_hit_rate": _rate(self.hit_tokens, self.prompt_tokens),
        }


class RunStats:
    """Accumulates per-request hits; ``window_s`` sets the hit-rate-over-time bins."""

    def __init__(self, t0: float = 0.0, window_s: float = 60.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.t0 = t0
        self.window_s = window_s
        self.total = _Tally()
        self.with_hit = 0
        self.cached_hist: Counter = Counter()
        self.windows: dict[int, _Tally] = {}
        self.groups: dict[str, _Tally] = {}
        self.turns: dict[int, _Tally] = {}
        self.session_requests = 0
        self.same_session_tokens = 0
        self.cross_session_tokens = 0

    def record(
        self,
        timestamp: float,
        prompt_tokens: int,
        hit_tokens: int,
        tenant: str | None = None,
        session: str | None = None,
        turn: int | None = None,
        same_session_tokens: int = 0,
    ) -> None:
        self.total.add(prompt_tokens, hit_tokens)
        self.with_hit += hit_tokens > 0
        self.cached_hist[hit_tokens] += 1
        w = max(0, int((timestamp - self.t0) // self.window_s))
        self.windows.setdefault(w, _Tally()).add(prompt_tokens, hit_tokens)
        if tenant is not None:
            self.groups.setdefault(tenant, _Tally()).add(prompt_tokens, hit_tokens)
        if turn is not None:
            self.turns.setdefault(min(turn, MAX_TURN), _Tally()).add(prompt_tokens, hit_tokens)
        if session is not None:
            self.session_requests += 1
            self.same_session_tokens += same_session_tokens
            self.cross_session_tokens += hit_tokens - same_session_tokens

    def as_dict(self) -> dict[str, Any]:
        t = self.total
        n = t.requests
        out: dict[str, Any] = {
            "token_hit_rate": _rate(t.hit_tokens, t.prompt_tokens),
            "requests": n,
            "prompt_tokens": t.prompt_tokens,
            "hit_tokens": t.hit_tokens,
            "requests_with_hit": self.with_hit / n if n else 0.0,
            "cached_tokens_mean": t.hit_tokens / n if n else 0.0,
            "cached_tokens_p50": quantile(self.cached_hist, 0.50),
            "cached_tokens_p99": quantile(self.cached_hist, 0.99),
            "window_s": self.window_s,
            "windows": [
                {"t_start": self.t0 + w * self.window_s, **self.windows[w].as_dict()} for w in sorted(self.windows)
            ],
        }
        if self.groups:
            out["groups"] = {k: v.as_dict() for k, v in sorted(self.groups.items())}
        if self.turns:
            out["turns"] = {(f"{k}+" if k == MAX_TURN else str(k)): v.as_dict() for k, v in sorted(self.turns.items())}
        if self.session_requests:
            hit = self.same_session_tokens + self.cross_session_tokens
            out["sessions"] = {
                "requests": self.session_requests,
                "same_session_hit_tokens": self.same_session_tokens,
                "cross_session_hit_tokens": self.cross_session_tokens,
                "same_session_share": _rate(self.same_session_tokens, hit),
            }
        return out
