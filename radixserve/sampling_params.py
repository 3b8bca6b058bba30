"""Per-request sampling parameters, validated once where they enter the engine.

This module imports nothing of the project, so every package may import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard

# The most top alternatives a request may ask for per position by default (OpenAI's limit); an
# engine's `max_logprobs` option sets its own limit, and -1 there allows any (vLLM's semantics).
MAX_LOGPROBS = 20
# The most completions one prompt may ask for: each is a request the engine holds, and a
# client must not be able to make the engine build millions of them.
MAX_N = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
# Structured-output kinds, in the order StructuredOutput lists them.
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's whole output, enforced token by token through xgrammar.

    Exactly one field is set: `json` (a JSON schema, as a dict or as JSON text), `json_object`
    (True: any JSON object), `regex` (the output matches it whole), `choice` (the output is one
    of these strings) or `grammar` (EBNF/GBNF text, root rule `root`). A request constrained so
    ends ("stop") once the grammar is complete and the model emits its end-of-sequence token.
    Shape is checked here; whether the schema, pattern or grammar compiles is checked when the
    request is submitted (Engine.check_params), with the model's vocabulary.
    """

    json: Mapping[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the constructor takes any sequence of strings
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if (getattr(self, k) is not None and getattr(self, k) is not False)]
        if len(given) != 1:
            raise ValueError(f"structured must set exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured.json_object must be a bool, got {self.json_object!r}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as exc:
                    raise ValueError(f"structured.json is not valid JSON text: {exc}") from None
            else:
                schema = self.json
            if not isinstance(schema, (Mapping, bool)):
                raise ValueError(f"structured.json must be a JSON schema (an object), got {type(schema).__name__}")
            try:  # the schema as text: what compiles, and what equal schemas share
                text = json.dumps(schema, allow_nan=False)  # key order kept: properties come in it
            except (TypeError, ValueError) as exc:
                raise ValueError(f"structured.json must be JSON-serializable: {exc}") from None
            object.__setattr__(self, "_text", text)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, Sequence) or not choice or not all(
                isinstance(c, str) and c for c in choice
            ):
                raise ValueError(f"structured.choice must be a non-empty sequence of non-empty strings, got {choice!r}")
            object.__setattr__(self, "choice", tuple(choice))

    @property
    def kind(self) -> str:
        """The field that is set (one of STRUCTURED_KINDS)."""
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) is not None and getattr(self, k) is not False)

    @property
    def text(self) -> str:
        """The constraint as text: the schema as JSON text, the pattern, the grammar, the
        choices as a JSON list, "" for json_object. With `kind`, what a compiled grammar is
        cached by."""
        kind = self.kind
        if kind == "json":
            return str(self.__dict__["_text"])
        if kind == "choice":
            return json.dumps(self.choice)
        if kind == "json_object":
            return ""
        return str(getattr(self, kind))

    def __hash__(self) -> int:  # a dict schema is not hashable: hash its text
        return hash((self.kind, self.text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StructuredOutput):
            return NotImplemented
        return (self.kind, self.text) == (other.kind, other.text)


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
    # The output follows this constraint (a JSON schema, regex, choice, grammar); None: free text.
    structured: StructuredOutput | None = None
    # Token id -> a value in [-100, 100] added to that token's logit at every step (OpenAI).
    # Typed as stored (a read-only mapping); the constructor takes any mapping of ints to numbers.
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
    # Only these ids may be sampled; None: any. The constructor takes any sequence of ints.
    allowed_token_ids: tuple[int, ...] | None = None
    # Words whose token sequence may not be completed (vLLM). Each is tokenized by the engine
    # with and without a leading space. The constructor takes one string or a sequence of them.
    bad_words: tuple[str, ...] = ()

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
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be None or a StructuredOutput, got {type(self.structured).__name__}")
        set_field(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        set_field(self, "allowed_token_ids", _normalize_allowed(self.allowed_token_ids))
        set_field(self, "bad_words", _normalize_bad_words(self.bad_words))
        if self.structured is not None:
            # Each of these can forbid every token the grammar allows at some point (the grammar
            # decides where the output ends, and which tokens may come).
            for name in ("min_tokens", "allowed_token_ids", "bad_words"):
                if getattr(self, name):
                    raise ValueError(f"{name} cannot be combined with structured: it could forbid every token "
                                     "the grammar allows")
        for name in ("max_tokens", "top_k", "min_tokens", "n", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            set_field(self, name, None if value is None else int(value))  # numpy ints -> int
        for name, *_ in _FLOAT_FIELDS:
            set_field(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """True when every step takes the argmax (temperature 0)."""
        return self.temperature == 0.0

    def __hash__(self) -> int:  # logit_bias is a mapping: hash its items
        return hash(tuple(
            tuple(sorted(v.items())) if isinstance(v, Mapping) else v
            for v in (getattr(self, f.name) for f in dataclasses.fields(self))
        ))

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


def _normalize_logit_bias(bias: object) -> Mapping[int, float]:
    allowed = f"a mapping of token ids (ints >= 0) to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    if bias is None:
        return MappingProxyType({})
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be {allowed}, got {bias!r}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _is_int(key) or int(key) < 0:
            raise ValueError(f"logit_bias must be {allowed}, got the key {key!r}")
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or abs(float(value)) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be {allowed}, got {value!r} for token {key}")
        out[int(key)] = float(value)
    return MappingProxyType(out)


def _normalize_allowed(ids: object) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if (
        not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not ids
        or not all(_is_int(i) and int(i) >= 0 for i in ids)
    ):
        raise ValueError(f"allowed_token_ids must be None or a non-empty sequence of ints >= 0, got {ids!r}")
    return tuple(sorted({int(i) for i in ids}))


def _normalize_bad_words(words: object) -> tuple[str, ...]:
    if words is None:
        return ()
    if isinstance(words, str):
        words = (words,)
    if not isinstance(words, Sequence) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"bad_words must be a string or a sequence of strings with a non-space character, "
                         f"got {words!r}")
    for i, word in enumerate(words):  # each is tokenized
        check_text(f"bad_words[{i}]", word)
    return tuple(words)


def check_text(field: str, text: str) -> None:
    """Text a tokenizer can encode: no lone UTF-16 surrogate (ValueError naming the field)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid Unicode text (a lone surrogate at index {exc.start})") from None
