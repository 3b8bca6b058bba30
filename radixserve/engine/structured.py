"""Structured output through xgrammar, and the tokenization of bad words.

One `GrammarCompiler` per engine, built from the served model's tokenizer with the
model's logits width as the vocabulary size, compiles each constraint once: compiled
grammars are kept in a bounded LRU cache keyed by (kind, text). Each request (each of
its n completions) gets its own `RequestGrammar`, a matcher over the shared compiled
grammar.

The matcher's invariant: it has accepted exactly the request's `output_ids`, in order.
The scheduler keeps it where tokens are appended (Scheduler._append_token accepts a
token right before appending it), and nothing else appends; a step whose tokens are
discarded (a failed step, an overlapped step's token after the request ended) never
reached that point. `sync` restores it by rolling back or accepting whatever differs,
and runs before every bitmask fill, so a mask is always computed from the kept output.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xg

from radixserve.sampling_params import StructuredOutput
from radixserve.scheduler.request import Grammar

# Compiled grammars kept (each holds a token mask cache of its own: tens of KB to a few MB).
GRAMMAR_CACHE_SIZE = 256
# xgrammar prefixes its errors with a time and a source location: "[12:00:00] /path/x.cc:94: ".
_XG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarCompilers:
    """The engine's xgrammar compiler and its LRU cache of compiled grammars (thread-safe:
    requests are validated on the callers' threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int],
                 cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        info = xg.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        # xgrammar's own cache is off: ours bounds the number of grammars kept.
        self.compiler = xg.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], xg.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # compilations (cache misses)

    def compile(self, structured: StructuredOutput) -> xg.CompiledGrammar:
        """The constraint compiled for this vocabulary; ValueError naming the field if it does not compile."""
        key = (structured.kind, structured.text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(*key)  # outside the lock: compiling can take a while
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.compiled += 1
        return compiled

    def _compile(self, kind: str, text: str) -> xg.CompiledGrammar:
        c = self.compiler
        try:
            if kind == "json":
                return c.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":  # any object, without free whitespace (small models loop on it)
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "choice":
                # A regex alternation of the literal choices.
                return c.compile_regex("|".join(_regex_literal(s) for s in json.loads(text)))
            return c.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            detail = _XG_PREFIX.sub("", str(exc).strip()).strip()
            raise ValueError(f"structured.{kind} does not compile: {detail}") from None

    def matcher(self, structured: StructuredOutput) -> RequestGrammar:
        return RequestGrammar(self.compile(structured), self.vocab_size)


def _regex_literal(s: str) -> str:
    """`s` as a regex that matches it alone (xgrammar's regex dialect: escape every special)."""
    return "".join("\\" + ch if ch in r"\^$.|?*+()[]{}/-" else ch for ch in s)


class RequestGrammar:
    """One completion's matcher (the scheduler's `Grammar`); see the module docstring."""

    def __init__(self, compiled: xg.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xg.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.accepted: list[int] = []  # the tokens the matcher holds, in order

    def accept(self, token_id: int) -> None:
        """Advance over `token_id`; ValueError if the grammar does not allow it there."""
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"the sampled token {token_id} is not allowed by the structured output's grammar "
                             "(no token satisfied every constraint of the request)")
        self.accepted.append(token_id)

    def is_terminated(self) -> bool:
        """Whether the grammar is complete and its end-of-sequence token was accepted."""
        return bool(self.matcher.is_terminated())

    def sync(self, output_ids: Sequence[int]) -> None:
        """Make the accepted tokens equal `output_ids`: roll back past their common prefix, then
        accept the rest. A no-op while the invariant holds (the common case)."""
        n = len(output_ids)
        if len(self.accepted) == n and (n == 0 or self.accepted[-1] == output_ids[-1]):
            return
        common = 0
        for a, b in zip(self.accepted, output_ids):
            if a != b:
                break
            common += 1
        if len(self.accepted) > common:
            self.matcher.rollback(len(self.accepted) - common)
            del self.accepted[common:]
        for tok in output_ids[common:]:
            self.accept(int(tok))

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (xgrammar's packed int32 layout)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)


def fill_bitmask(grammars: Sequence[Grammar | None], outputs: Sequence[Sequence[int]],
                 vocab_size: int) -> tuple[torch.Tensor, list[int]]:
    """The packed [B, ceil(V/32)] int32 mask (host) of a step's rows and the rows it constrains:
    each grammar first synced to its request's output. Rows without a grammar allow everything."""
    bitmask = xg.allocate_token_bitmask(len(grammars), vocab_size)
    rows = []
    for i, (grammar, output) in enumerate(zip(grammars, outputs)):
        if grammar is not None:
            grammar.sync(output)
            grammar.fill(bitmask, i)
            rows.append(i)
    return bitmask, rows


def bad_word_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of each bad word, as it would start the text and after a space (vLLM)."""
    seqs: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in seqs:
                seqs.append(ids)
    return tuple(seqs)

