"""Token ids -> streamed text, one request at a time, with stop strings.

Incremental decoding keeps two offsets into the ids (as vLLM does):

    ids:   [ ... | prefix window | unread ids ... ]
                 ^prefix_offset  ^read_offset

Each call decodes `ids[prefix_offset:read_offset]` and `ids[prefix_offset:]`; the
text the second has beyond the first is new. Decoding with a little context
before the new ids keeps what the tokenizer does at token boundaries (leading
spaces, byte pieces) the same as in a full decode, and costs O(new tokens).
When the new text ends in U+FFFD the last character's bytes are incomplete:
nothing moves until a later token completes them (or `flush`).

Stop strings: the streamed text never holds any part of a stop string. Text is
held back while its tail could still start one (the longest suffix that is a
prefix of some stop string), so a stop string spanning several tokens is seen
whole. Invariant: a stop string can only start at or after `_emitted`, so each
search scans only the unreleased tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

# Prompt tokens decoded as context before the first output token (vLLM uses 5):
# the output is a continuation, so e.g. SentencePiece's "▁Paris" reads " Paris".
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class DetokResult(NamedTuple):
    delta_text: str  # new text to stream; never part of a stop string (unless included)
    stopped: bool  # a stop string was matched: generation should end


class IncrementalDetokenizer:
    """Streams the text of one completion as token ids arrive.

    After `flush()` (and without a stop string), `text` equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)` for byte-level BPE
    tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen). For SentencePiece-style
    tokenizers the first token's leading space is kept, as a continuation of the
    prompt should read. `tokenizer` is a Hugging Face tokenizer (anything with
    `decode(ids, skip_special_tokens=...)`).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: str | Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a sequence of non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        # Like vLLM: stop strings count only once min_tokens tokens exist.
        self._min_tokens = min_tokens
        context = list(prompt_ids[max(0, len(prompt_ids) - _CONTEXT_TOKENS) :])
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []  # the prompt ends inside a character: its bytes would shift our offsets
        self._ids: list[int] = context  # context, then the output ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""  # decoded output text, including text still held back
        self._emitted = 0  # characters of _text already streamed
        self._stopped = False
        self._finished = False
        self.matched_stop: str | None = None  # the stop string that ended the text, if any

    @property
    def text(self) -> str:
        """The text streamed so far: the concatenation of every `delta_text`."""
        return self._text[: self._emitted]

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def stopped(self) -> bool:
        return self._stopped

    def append(self, token_ids: Sequence[int]) -> DetokResult:
        """Add newly generated ids; returns the text they release and whether a stop string hit."""
        if self._stopped or self._finished:
            raise RuntimeError("append() after the detokenizer stopped or was flushed")
        self._ids.extend(token_ids)
        self._text += self._decode_new(final=False)
        return self._release(final=False)

    def flush(self) -> DetokResult:
        """Generation ended for another reason: release everything held back (incomplete
        characters decode as U+FFFD, like a full decode). Idempotent."""
        if self._stopped or self._finished:
            return DetokResult("", self._stopped)
        self._text += self._decode_new(final=True)
        result = self._release(final=True)
        self._finished = True
        return result

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text of the ids past read_offset; "" while the last character is incomplete."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, final: bool) -> DetokResult:
        """Streams what is safe of _text: up to a stop string, else all but a possible stop prefix."""
        active = len(self._ids) - self._num_context >= self._min_tokens
        hit = self._find_stop() if active else None
        if hit is not None:
            begin, end = hit
            self.matched_stop = self._text[begin:end]
            cut = end if self._include_stop else begin
            self._text = self._text[:cut]
            self._stopped = True
        else:
            cut = len(self._text) - (0 if final or not active else self._held_len())
        delta = self._text[self._emitted : cut]
        self._emitted = cut
        return DetokResult(delta, self._stopped)

    def _find_stop(self) -> tuple[int, int] | None:
        """(begin, end) of the stop string that ends first in the unreleased text
        (on a tie, the longest): where token-by-token streaming would stop."""
        best: tuple[int, int] | None = None  # (end, begin)
        for s in self._stop:
            begin = self._text.find(s, self._emitted)
            if begin >= 0 and (best is None or (begin + len(s), begin) < best):
                best = (begin + len(s), begin)
        return None if best is None else (best[1], best[0])

    def _held_len(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        available = len(self._text) - self._emitted
        held = 0
        for s in self._stop:
            for length in range(min(len(s) - 1, available), held, -1):
                if self._text.endswith(s[:length]):
                    held = length
                    break
        return held
