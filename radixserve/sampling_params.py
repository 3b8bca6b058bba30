"""Per-request sampling parameters, validated once where they enter the engine.

This module imports nothing of the project, so every package may import it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

# The most top alternatives a request may ask for per position by default (OpenAI's limit); an
# engine's `max_logprobs` option sets its own limit, and -1 there allows any (vLLM's semantics).
MAX_LOGPROBS = 20
# The most completions one prompt may ask for: each is a request the engine holds, and a
# client must not be able to make the engine build millions of them.
MAX_N = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    Every field is validated in `__post_init__`: a bad value raises `ValueError`
    naming the field and what it allows. `stop` and `stop_token_ids` are
    normalized to tuples, so instances are hashable and never share mutable state.
    """

    # >= 0: output tokens at most. 0 samples nothing: the request finishes after its prompt's
    # prefill with finish_reason "length" (to score a prompt with `prompt_logprobs`).
    max_tokens: int = 128
    temperature: float = 1.0  # >= 0; 0 means greedy (argmax)
    top_p: float = 1.0  # in (0, 1]; 1 disables
    top_k: int = -1  # >= 1 keeps the k most likely tokens; -1 or 0 disables
    min_p: float = 0.0  # in [0, 1]: drop tokens with p < min_p * p_max; 0 disables
    repetition_penalty: float = 1.0  # > 0; applies to prompt and output tokens; 1 disables
    presence_penalty: float = 0.0  # in [-2, 2]; applies to output tokens (OpenAI)
    frequency_penalty: float = 0.0  # in [-2, 2]; applies to output tokens (OpenAI)
    seed: int | None = None  # None: the scheduler draws one; any int (taken modulo 2**64)
    # Typed as stored. The constructor also takes one string, any sequence of them, or None (()).
    stop: tuple[str, ...] = ()
    # Typed as stored (ints >= 0). The constructor also takes any sequence of ints, or None (()).
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # 0 <= min_tokens <= max_tokens: EOS and stop ids forbidden before
    ignore_eos: bool = False
    n: int = 1  # in [1, MAX_N]: completions per prompt
    # None: no logprobs; 0: the sampled token's only; k >= 1: plus the top k per step; -1: plus
    # every token of the vocabulary. The engine caps k (its max_logprobs, 20 by default).
    logprobs: int | None = None
    # None: none; 0: the logprob (and rank) of each prompt token after the first; k >= 1: plus the
    # top k alternatives at each position; -1: the whole vocabulary. Capped like `logprobs`.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, low, high in _INT_FIELDS:
            _check_int(name, getattr(self, name), low=low, high=high)
        _check_int("top_k", self.top_k, low=-1, allowed="-1 or 0 (disabled) or an int >= 1")
        _check_int(
            "min_tokens", self.min_tokens, low=0, high=self.max_tokens,
            allowed=f"an int in [0, max_tokens={self.max_tokens}]",
        )
        if self.seed is not None:
            _check_int("seed", self.seed, allowed="None or an int")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=-1,
                           allowed="None, -1 (the whole vocabulary) or an int >= 0")
        for name, f_low, f_high, low_open, allowed in _FLOAT_FIELDS:
            _check_float(name, getattr(self, name), low=f_low, high=f_high, low_open=low_open, allowed=allowed)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        # Frozen: normalized values go in through object.__setattr__ (the dataclass way).
        set_field = object.__setattr__
        set_field(self, "stop", _normalize_stop(self.stop))
        set_field(self, "stop_token_ids", _normalize_stop_token_ids(self.stop_token_ids))
        for name in ("max_tokens", "top_k", "min_tokens", "n", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            set_field(self, name, None if value is None else int(value))  # numpy ints -> int
        for name, *_ in _FLOAT_FIELDS:
            set_field(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """True when every step takes the argmax (temperature 0)."""
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied, validated like a new instance."""
        return dataclasses.replace(self, **changes)


def top_count(k: int, vocab_size: int) -> int:
    """How many alternatives a `logprobs` or `prompt_logprobs` value asks for: -1 is the vocabulary."""
    return vocab_size if k == -1 else min(k, vocab_size)


def widest(a: int | None, b: int | None) -> int | None:
    """The larger of two top-N asks, -1 (the whole vocabulary) the largest; None: not asked."""
    if a is None or b is None:
        return b if a is None else a
    return -1 if -1 in (a, b) else max(a, b)


# (field, low, high): plain int ranges; high None means unbounded.
_INT_FIELDS = (("max_tokens", 0, None), ("n", 1, MAX_N))
# (field, low, high, low is exclusive, what is allowed): every float must also be finite.
_FLOAT_FIELDS = (
    ("temperature", 0.0, None, False, "a finite float >= 0 (0 means greedy)"),
    ("top_p", 0.0, 1.0, True, "a float in (0, 1]"),
    ("min_p", 0.0, 1.0, False, "a float in [0, 1]"),
    ("repetition_penalty", 0.0, None, True, "a finite float > 0"),
    ("presence_penalty", -2.0, 2.0, False, "a float in [-2, 2]"),
    ("frequency_penalty", -2.0, 2.0, False, "a float in [-2, 2]"),
)


def _is_int(value: object) -> TypeGuard[numbers.Integral]:  # int, numpy ints; not bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(
    name: str, value: object, *, low: int | None = None, high: int | None = None, allowed: str | None = None
) -> None:
    if allowed is None:
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    ok = _is_int(value) and (low is None or int(value) >= low) and (high is None or int(value) <= high)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_float(
    name: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    allowed: str,
) -> None:
    ok = False
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        x = float(value)
        ok = (x > low if low_open else x >= low) and (high is None or x <= high)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def _normalize_stop(stop: object) -> tuple[str, ...]:
    allowed = "None, a non-empty string or a sequence of non-empty strings"
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be {allowed}, got {stop!r}")
    return tuple(stop)


def _normalize_stop_token_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if (
        not isinstance(ids, Sequence) or isinstance(ids, (str, bytes))
        or not all(_is_int(i) and int(i) >= 0 for i in ids)
    ):
        raise ValueError(f"stop_token_ids must be None or a sequence of ints >= 0, got {ids!r}")
    return tuple(int(i) for i in ids)
