"""Tool calls out of generated text, incrementally: the same parser serves streams and whole responses
(the formats' parsers are in tool_formats.py).

A parser is fed the text as it is generated (`feed`, any split) and `finish`ed at the end; it
returns `Piece`s: content text, a call's start (its index and name) and fragments of its
arguments, in order. Every decision depends only on the text seen so far, read one
character at a time, so the pieces do not depend on how the text was split (only on
how they are grouped). Formats:

    hermes       text <tool_call>{"name": "f", "arguments": {...}}</tool_call> text ...   (Qwen2.5, Qwen3, Hermes)
    llama3_json  [<|python_tag|>]{"name": "f", "parameters": {...}}; {...}             (Llama 3.1+, at the start only)
    forced       [{"name": "f", "arguments": {...}}, ...]   (tool_choice "required", under a JSON schema)
    named        {...}                                        (a named tool_choice: the arguments alone)

A call whose JSON starts `{"name": "...", "arguments": ` (llama3: or "parameters") is
announced once its name is read, and its arguments stream as the model writes them (the
raw text of the value). Any other shape (keys in another order, say) is held until the
block ends and then read whole: a call if it is a JSON object with a string `name` and an
object `arguments`, else content, markup included. Whitespace between text and a call
is dropped; nothing of the `<tool_call>` markup of a call reaches the content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONTENT, CALL, ARGS = "content", "call", "args"
_MAX_HEADER = 1024  # characters of a block before its header is read as "not a fast header"
_ORDINARY_END = re.compile(r'["\\{}\[\]<>]')  # what can change a block's state: brackets, quotes, tags


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Piece:
    """`content` text; `call` (index, text = the name, call_id); `args` (index, text = a fragment)."""

    kind: str
    text: str
    index: int = 0
    call_id: str = ""


class Pieces(list[Piece]):
    """Pieces in order; neighbours of one kind (content, or one call's arguments) merge."""

    def add(self, kind: str, text: str, index: int = 0, call_id: str = "") -> None:
        if kind != CALL and not text:
            return
        if kind != CALL and self and self[-1].kind == kind and self[-1].index == index:
            self[-1].text += text
        else:
            self.append(Piece(kind, text, index, call_id))


class _Depth:
    """Nesting depth of a JSON text read char by char (brackets inside strings don't count)."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self._in_str = False
        self._escape = False

    def step(self, c: str) -> None:
        if self._in_str:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_str = False
        elif c == '"':
            self._in_str = True
        elif c in "{[":
            self.depth += 1
            self.started = True
        elif c in "}]":
            self.depth -= 1

    @property
    def escaping(self) -> bool:
        """The next character is escaped (inside a string, after a backslash)."""
        return self._escape

    @property
    def closed(self) -> bool:
        return self.started and self.depth <= 0 and not self._in_str


def _header(buf: str, arg_keys: tuple[str, ...]) -> tuple[str, str]:
    """Reads `{"name": STR, "<arg key>": {` from the start of `buf`: ("need", "") while it may
    still come, ("fast", name) once it has (the arguments' "{" last), ("slow", "") if not."""
    i = 0

    def literal(options: tuple[str, ...]) -> str:
        nonlocal i
        while i < len(buf) and buf[i].isspace():
            i += 1
        rest = buf[i:]
        for lit in options:
            if rest.startswith(lit):
                i += len(lit)
                return "ok"
        return "need" if any(lit.startswith(rest) for lit in options) else "slow"

    for step in ("{", '"name"', ":", "STR", ",", "KEY", ":", "{"):
        if step == "STR":
            while i < len(buf) and buf[i].isspace():
                i += 1
            if i == len(buf):
                return "need", ""
            if buf[i] != '"':
                return "slow", ""
            end = _string_end(buf, i)
            if end is None:
                return "need", ""
            try:
                name = json.loads(buf[i:end])
            except ValueError:
                return "slow", ""
            i = end
            continue
        status = literal(tuple(f'"{k}"' for k in arg_keys) if step == "KEY" else (step,))
        if status != "ok":
            return status, ""
    return "fast", name


def _string_end(text: str, start: int) -> int | None:
    """The index after the JSON string that opens at `text[start]`; None if it has not ended."""
    escape = False
    for j in range(start + 1, len(text)):
        c = text[j]
        if escape:
            escape = False
        elif c == "\\":
            escape = True
        elif c == '"':
            return j + 1
    return None


def read_call(text: str, arg_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a whole call object, or None if `text` is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    keys = [k for k in arg_keys if k in obj]
    if len(keys) > 1:
        return None
    args = obj[keys[0]] if keys else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            if isinstance(json.loads(args), dict):
                return obj["name"], args
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


@dataclass
class Block:
    """One call object being read: its header, then its arguments, then up to its end."""

    end_tag: str | None  # hermes: ends at this tag; else: where the JSON object closes
    raw: str = ""
    state: str = "header"  # header -> args -> tail, or header -> slow
    index: int = -1  # the call's index once announced; -1 before, or while dropped
    dropped: bool = False  # a call past max_calls: read to its end, shown nowhere
    outer: _Depth = field(default_factory=_Depth)
    args: _Depth = field(default_factory=_Depth)

    def ended(self) -> bool:
        if self.end_tag is not None:
            return self.raw.endswith(self.end_tag)
        return self.outer.closed

    def body(self) -> str:
        """The block's JSON text (the end tag cut off)."""
        if self.end_tag is not None and self.raw.endswith(self.end_tag):
            return self.raw[: -len(self.end_tag)]
        return self.raw


class ToolParser:
    """Base: call numbering, the call limit, and the reading of one block."""

    arg_keys: tuple[str, ...] = ("arguments",)

    def __init__(self, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id) -> None:
        self.max_calls = max_calls
        self.new_id = new_id
        self.calls = 0  # calls announced
        self._out = Pieces()

    # -- the interface -----------------------------------------------------------------------

    def feed(self, text: str) -> Pieces:
        i = 0
        while i < len(text):
            # A run of characters that the state reads alike goes at once (long replies, long arguments);
            # the result is what reading them one by one gives.
            n = self._run(text, i)
            if n:
                i += n
            else:
                self._char(text[i])
                i += 1
        return self._take()

    def _run(self, text: str, i: int) -> int:
        """Reads a run of characters from text[i] that need no look at each one; how many (0: none)."""
        return 0

    def finish(self) -> Pieces:
        self._end()
        return self._take()

    def _take(self) -> Pieces:
        out, self._out = self._out, Pieces()
        return out

    def _char(self, c: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    # -- calls --------------------------------------------------------------------------------

    def _announce(self, block: Block, name: str) -> None:
        if self.max_calls is not None and self.calls >= self.max_calls:
            block.dropped = True
            return
        block.index = self.calls
        self.calls += 1
        self._out.add(CALL, name, block.index, self.new_id())

    def _args(self, block: Block, text: str) -> None:
        if not block.dropped:
            self._out.add(ARGS, text, block.index)

    def _block_run(self, block: Block, text: str, i: int) -> int:
        """Past its header, a block reads the characters from text[i] up to the next one that can
        change its state (a JSON bracket, quote or backslash; the end tag's "<" or ">") at once."""
        if block.state == "header" or block.args.escaping or block.outer.escaping:
            return 0
        m = _ORDINARY_END.search(text, i)
        end = m.start() if m else len(text)
        run = text[i:end]
        block.raw += run
        if block.state == "args":
            self._args(block, run)
        return len(run)

    def _block_char(self, block: Block, c: str) -> bool:
        """Reads `c` into `block`; True when the block has ended."""
        block.raw += c
        block.outer.step(c)
        if block.state == "header":
            status, name = _header(block.raw, self.arg_keys)
            if status == "need" and len(block.raw) > _MAX_HEADER:
                status = "slow"
            if status == "fast":
                block.state = "args"
                self._announce(block, name)
                block.args.step("{")
                self._args(block, "{")
                return False
            if status == "slow":
                block.state = "slow"
        elif block.state == "args":
            block.args.step(c)
            self._args(block, c)
            if block.args.closed:
                block.state = "tail"
            return False
        return block.ended()

    def _close_block(self, block: Block, finished: bool) -> bool:
        """A block that ended (or the text did): a slow block becomes a call if it reads as one.
        False if it is not a call (the caller shows its text as content)."""
        if block.state in ("args", "tail"):
            return True
        call = read_call(block.body(), self.arg_keys) if block.state == "slow" or finished else None
        if call is None:
            return False
        self._announce(block, call[0])
        self._args(block, call[1])
        return True


@dataclass
class ParsedCalls:
    content: str
    calls: list[dict[str, Any]]  # OpenAI tool_calls: {"id", "type", "function": {"name", "arguments"}}


def collect(pieces: list[Piece]) -> ParsedCalls:
    """The content and the calls that `pieces` spell, whole."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for p in pieces:
        if p.kind == CONTENT:
            content.append(p.text)
        elif p.kind == CALL:
            calls.append({"id": p.call_id, "type": "function", "function": {"name": p.text, "arguments": ""}})
        else:
            calls[p.index]["function"]["arguments"] += p.text
    return ParsedCalls("".join(content), calls)


def parse_whole(parser: ToolParser, text: str) -> ParsedCalls:
    """A whole response's calls: the streamed pieces of `text`, except that if a call's arguments
    are not a JSON object (a malformed or cut-off call), all of `text` is content and there is no call."""
    pieces = parser.feed(text) + parser.finish()
    parsed = collect(pieces)
    for call in parsed.calls:
        try:
            ok = isinstance(json.loads(call["function"]["arguments"]), dict)
        except ValueError:
            ok = False
        if not ok:
            return ParsedCalls(text, [])
    return parsed
