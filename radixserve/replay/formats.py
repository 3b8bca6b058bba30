"""Trace formats: detection, validation and streaming parsing into TraceRequest.

Three formats, one JSON object per line:

    mooncake  {"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}
    bailian   {"chat_id", "parent_chat_id", "timestamp": s, "input_length",
               "output_length", "type", "turn", "hash_ids": [...]}
    tokens    {"timestamp": s, "input_ids": [...] | "prompt": str, "output_len",
               optional "tenant", "session", "priority"}

Hash-id formats describe a prompt as blocks of ``block_size`` tokens (512 for
mooncake, 16 for bailian by default); block i's id stands for the block's
content after blocks 0..i-1, and the last block may be partial. Reading streams
the file: nothing but the current line is held, except the chat -> session map
of bailian traces (one int per chat, the only way to find a turn's session).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("mooncake", "bailian", "tokens")
DEFAULT_BLOCK_SIZE = {"mooncake": 512, "bailian": 16, "tokens": 1}

Tokenize = Callable[[str], list[int]]


class TraceFormatError(ValueError):
    """A line that is not a valid request of the trace's format."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.reason = message


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, whatever its format.

    Exactly one of ``hash_ids`` (block ids, each standing for ``block_size``
    tokens, the last one for ``input_length - block_size * (len - 1)``) and
    ``input_ids`` is set. ``timestamp`` is in seconds.
    """

    index: int  # position among the trace's valid requests, from 0
    line: int  # line number in the file, from 1
    timestamp: float
    input_length: int
    output_length: int
    block_size: int  # 1 for token-level requests
    hash_ids: tuple[int, ...] | None = None
    input_ids: tuple[int, ...] | None = None
    tenant: str | None = None  # per-group report key: "tenant" (tokens) or "type" (bailian)
    session: str | None = None
    turn: int | None = None
    priority: float = 0.0

    @property
    def last_block_tokens(self) -> int:
        """Tokens in the last key element (a partial block, or block_size)."""
        if self.hash_ids is None:
            return 1
        return self.input_length - self.block_size * (len(self.hash_ids) - 1)


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a parsed line belongs to, or None if no format fits."""
    if "input_ids" in record or "prompt" in record:
        return "tokens"
    if "hash_ids" in record and "chat_id" in record:
        return "bailian"
    if "hash_ids" in record and "input_length" in record:
        return "mooncake"
    return None


# ------------------------------------------------------------------ field checks


class _Bad(Exception):
    """Raised by field checks; turned into TraceFormatError with the line number."""


def _int(rec: dict[str, Any], name: str, minimum: int | None = 0) -> int:
    if name not in rec:
        raise _Bad(f"missing field {name!r}")
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _Bad(f"{name!r} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise _Bad(f"{name!r} must be >= {minimum}, got {v}")
    return v


def _number(rec: dict[str, Any], name: str) -> float:
    if name not in rec:
        raise _Bad(f"missing field {name!r}")
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
        raise _Bad(f"{name!r} must be a number >= 0, got {v!r}")
    return float(v)


def _int_list(rec: dict[str, Any], name: str) -> tuple[int, ...]:
    v = rec.get(name)
    if not isinstance(v, list):
        raise _Bad(f"{name!r} must be a list of integers, got {type(v).__name__}")
    if not set(map(type, v)) <= {int} or (v and min(v) < 0):  # C-speed check of long lists
        bad = next(x for x in v if type(x) is not int or x < 0)
        raise _Bad(f"{name!r} must hold integers >= 0 only, found {bad!r}")
    return tuple(v)


def _optional_str(rec: dict[str, Any], name: str) -> str | None:
    v = rec.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Bad(f"{name!r} must be a string or an integer, got {v!r}")
    return str(v)


def _blocks(rec: dict[str, Any], block_size: int) -> tuple[int, tuple[int, ...]]:
    input_length = _int(rec, "input_length", 1)
    hash_ids = _int_list(rec, "hash_ids")
    need = -(-input_length // block_size)
    if len(hash_ids) != need:
        raise _Bad(
            f"hash_ids has {len(hash_ids)} blocks but input_length {input_length} needs "
            f"{need} blocks of {block_size} tokens (is --block-size right?)"
        )
    return input_length, hash_ids


# ------------------------------------------------------------------------ reader


class TraceReader:
    """Streams a trace file as TraceRequest objects; iterate it once per pass.

    ``skip_bad``: a malformed line is skipped and counted in ``skipped``
    (the first few are logged) instead of raising TraceFormatError.
    Every pass over the same file yields the same requests.
    """

    def __init__(
        self,
        path: str | Path,
        fmt: str | None = None,
        block_size: int | None = None,
        skip_bad: bool = False,
        tokenize: Tokenize | None = None,
    ) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.path = str(path)
        if not Path(path).is_file():
            raise ValueError(f"trace file not found: {self.path}")
        self.skip_bad = skip_bad
        self.tokenize = tokenize
        self.format = fmt if fmt is not None else self._detect()
        if self.format == "tokens":
            if block_size not in (None, 1):
                raise ValueError("block_size applies to hash-id traces only (tokens traces are per token)")
            self.block_size = 1
        else:
            self.block_size = block_size if block_size is not None else DEFAULT_BLOCK_SIZE[self.format]
        self.skipped = 0  # malformed lines skipped in the last complete pass
        self.first_error: str | None = None

    def _open(self) -> io.TextIOBase:
        if self.path.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8")
        return open(self.path, encoding="utf-8")

    def _detect(self) -> str:
        """Format of the first parseable line (the first line, unless skip_bad)."""
        with self._open() as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as exc:
                    if self.skip_bad:
                        continue
                    raise TraceFormatError(self.path, lineno, f"not valid JSON ({exc.msg})") from None
                fmt = detect_format(rec) if isinstance(rec, dict) else None
                if fmt is None:
                    if self.skip_bad:
                        continue
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise TraceFormatError(
                        self.path, lineno,
                        f"cannot tell the trace format from keys {keys}; pass --format, one of {FORMATS}",
                    )
                return fmt
        raise ValueError(f"{self.path}: no request found to detect the format from")

    def __iter__(self) -> Iterator[TraceRequest]:
        parse = {"mooncake": self._mooncake, "bailian": self._bailian, "tokens": self._tokens}[self.format]
        skipped = 0
        index = 0
        sessions: dict[int, int] = {}  # bailian: chat_id -> root chat_id
        with self._open() as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise _Bad(f"not valid JSON ({exc.msg})") from None
                    if not isinstance(rec, dict):
                        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
                    req = parse(rec, index, lineno, sessions)
                except _Bad as bad:
                    if not self.skip_bad:
                        raise TraceFormatError(self.path, lineno, str(bad)) from None
                    if skipped < 5:
                        logger.warning("%s:%d: skipped: %s", self.path, lineno, bad)
                    if self.first_error is None:
                        self.first_error = f"line {lineno}: {bad}"
                    skipped += 1
                    continue
                index += 1
                yield req
        self.skipped = skipped

    # Parsers: one per format, each from a dict to a TraceRequest or _Bad.

    def _mooncake(self, rec: dict, index: int, line: int, sessions: dict) -> TraceRequest:
        input_length, hash_ids = _blocks(rec, self.block_size)
        return TraceRequest(
            index=index, line=line,
            timestamp=_number(rec, "timestamp") / 1000.0,
            input_length=input_length,
            output_length=_int(rec, "output_length"),
            block_size=self.block_size,
            hash_ids=hash_ids,
        )

    def _bailian(self, rec: dict, index: int, line: int, sessions: dict) -> TraceRequest:
        input_length, hash_ids = _blocks(rec, self.block_size)
        chat_id = _int(rec, "chat_id", None)
        parent = _int(rec, "parent_chat_id", None)
        # A turn whose parent lies before the trace's start is grouped under the parent.
        root = chat_id if parent < 0 else sessions.get(parent, parent)
        sessions[chat_id] = root
        turn = _int(rec, "turn", 0) if "turn" in rec else None
        return TraceRequest(
            index=index, line=line,
            timestamp=_number(rec, "timestamp"),
            input_length=input_length,
            output_length=_int(rec, "output_length"),
            block_size=self.block_size,
            hash_ids=hash_ids,
            tenant=_optional_str(rec, "type"),
            session=str(root),
            turn=turn,
        )

    def _tokens(self, rec: dict, index: int, line: int, sessions: dict) -> TraceRequest:
        if "input_ids" in rec:
            ids = _int_list(rec, "input_ids")
        else:
            prompt = rec.get("prompt")
            if not isinstance(prompt, str):
                raise _Bad(f"'prompt' must be a string, got {type(prompt).__name__}")
            if self.tokenize is None:
                # A configuration error, not a bad line: never skipped.
                raise ValueError(f"{self.path}:{line}: a 'prompt' needs a tokenizer (--tokenizer)")
            ids = tuple(self.tokenize(prompt))
        if not ids:
            raise _Bad("the prompt is empty")
        priority = rec.get("priority", 0.0)
        if isinstance(priority, bool) or not isinstance(priority, (int, float)):
            raise _Bad(f"'priority' must be a number, got {priority!r}")
        return TraceRequest(
            index=index, line=line,
            timestamp=_number(rec, "timestamp"),
            input_length=len(ids),
            output_length=_int(rec, "output_len"),
            block_size=1,
            input_ids=ids,
            tenant=_optional_str(rec, "tenant"),
            session=_optional_str(rec, "session"),
            turn=_int(rec, "turn", 0) if "turn" in rec else None,
            priority=float(priority),
        )
