"""The tool call formats (see tool_parser.py for how a parser reads): hermes blocks anywhere in
the text, a JSON list of calls at its start (llama3_json, a forced "required" reply), and a
named tool choice's bare arguments."""

from __future__ import annotations

from collections.abc import Callable

from radixserve.server.tool_parser import CONTENT, Block, ToolParser, new_call_id

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


class HermesParser(ToolParser):
    """Text with `<tool_call>JSON</tool_call>` blocks anywhere (Qwen2.5, Qwen3, Hermes 2 Pro)."""

    def __init__(self, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(max_calls, new_id)
        self._block: Block | None = None
        self._tag = ""  # a prefix of the open tag, held back
        # Whitespace held back. Between text and calls it is dropped, except that text resuming
        # after calls is joined to the text before them with the whitespace that preceded the calls.
        self._space = ""
        self._said = False  # content shown yet
        self._after_call = False  # since the last call: whitespace is dropped

    def _run(self, text: str, i: int) -> int:
        if self._block is not None:
            return self._block_run(self._block, text, i)
        if self._tag:
            return 0
        end = text.find("<", i)
        span = text[i:] if end < 0 else text[i:end]
        # Reads as char by char would: whitespace after a call dropped, trailing whitespace held.
        body = span.lstrip() if self._after_call else span
        text_part = body.rstrip()
        if text_part:
            self._text(text_part)
            self._space += body[len(text_part):]
        elif not self._after_call:
            self._space += body
        return len(span)

    def _char(self, c: str) -> None:
        if self._block is not None:
            if self._block_char(self._block, c):
                self._end_block(finished=False)
            return
        if self._tag or c == "<":
            if HERMES_OPEN.startswith(self._tag + c):
                self._tag += c
                if self._tag == HERMES_OPEN:
                    self._tag = ""
                    if not self._said:
                        self._space = ""
                    self._block = Block(end_tag=HERMES_CLOSE)
                return
            held, self._tag = self._tag, ""
            self._text(held)
            self._char(c)
        elif c.isspace():
            if not self._after_call:
                self._space += c
        else:
            self._text(c)

    def _text(self, text: str) -> None:
        self._out.add(CONTENT, self._space + text)
        self._space = ""
        self._said = True
        self._after_call = False

    def _end_block(self, finished: bool) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        if self._close_block(block, finished):
            self._after_call = True
        else:
            self._text(HERMES_OPEN + block.raw)

    def _end(self) -> None:
        if self._block is not None:
            self._end_block(finished=True)
        if self._tag:
            self._text(self._tag)
        elif not self._after_call:
            self._out.add(CONTENT, self._space)
        self._space = self._tag = ""


class JsonListParser(ToolParser):
    """Calls as JSON objects at the start of the text, separated by `sep`: Llama 3's
    `[<|python_tag|>]{...}; {...}`, and a forced `[{...}, {...}]`. Text that is not such a list
    is content (all of it, from where the list stops)."""

    def __init__(
        self,
        *,
        sep: str,
        arg_keys: tuple[str, ...],
        prefix: str = "",
        opener: str = "",
        closer: str = "",
        max_calls: int | None = None,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        super().__init__(max_calls, new_id)
        self.arg_keys = arg_keys
        self._sep, self._prefix, self._opener, self._closer = sep, prefix, opener, closer
        self._state = "start"  # start -> item -> between -> item ... -> done; or content
        self._held = ""  # start: leading text that may still open the list
        self._block: Block | None = None

    def _run(self, text: str, i: int) -> int:
        if self._state == "content":
            self._out.add(CONTENT, text[i:])
            return len(text) - i
        if self._state == "item" and self._block is not None:
            return self._block_run(self._block, text, i)
        return 0

    def _char(self, c: str) -> None:
        if self._state == "content":
            self._out.add(CONTENT, c)
        elif self._state == "start":
            self._start(c)
        elif self._state == "item":
            if self._block is not None:
                if self._block_char(self._block, c):
                    self._end_block(finished=False)
            elif c == "{":
                self._block = Block(end_tag=None)
                self._block_char(self._block, c)
            elif not c.isspace():
                self._to_content(c)
        elif self._state == "between":
            if c == self._sep:
                self._state = "item"
            elif self._closer and c == self._closer:
                self._state = "done"
            elif not c.isspace():
                self._to_content(c)

    def _start(self, c: str) -> None:
        """Leading whitespace, the prefix tag and the opener are held until the first call's "{"."""
        self._held += c
        head = self._held.lstrip()
        if not head:
            return
        if self._prefix:
            if len(head) < len(self._prefix) and self._prefix.startswith(head):
                return  # may still become the prefix tag
            if head.startswith(self._prefix):
                head = head[len(self._prefix):].lstrip()
                if not head:
                    return
        if self._opener:
            if head[0] != self._opener:
                self._to_content(self._held)
                return
            head = head[1:].lstrip()
            if not head:
                return
        if head != "{":
            self._to_content(self._held)
            return
        self._held = ""
        self._state = "item"
        self._char("{")

    def _to_content(self, text: str) -> None:
        self._state = "content"
        self._held = ""
        self._out.add(CONTENT, text)

    def _end_block(self, finished: bool) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        if self._close_block(block, finished):
            self._state = "between"
        else:
            self._to_content(block.raw)

    def _end(self) -> None:
        if self._block is not None:
            self._end_block(finished=True)
        elif self._state == "start" and self._held:
            self._to_content(self._held)


class NamedParser(ToolParser):
    """The whole text is the arguments of one call to `name` (a named tool_choice, under its schema)."""

    def __init__(self, name: str, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(1, new_id)
        self._name = name
        self._block = Block(end_tag=None, state="args")
        self._started = False

    def _run(self, text: str, i: int) -> int:
        return self._block_run(self._block, text, i) if self._started else 0

    def _char(self, c: str) -> None:
        if not self._started:
            if c.isspace():
                return
            self._started = True
            self._announce(self._block, self._name)
        if self._block.state == "args":
            self._block.args.step(c)
            self._args(self._block, c)
            if self._block.args.closed:
                self._block.state = "tail"

    def _end(self) -> None:
        if not self._started:
            self._started = True
            self._announce(self._block, self._name)


PARSERS = ("hermes", "llama3_json")


def make_parser(fmt: str, *, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id) -> ToolParser:
    """A parser for `fmt`: "hermes", "llama3_json", "required" (a forced list), or "named:<name>"."""
    if fmt == "hermes":
        return HermesParser(max_calls, new_id)
    if fmt == "llama3_json":
        return JsonListParser(sep=";", prefix=PYTHON_TAG, arg_keys=("parameters", "arguments"),
                              max_calls=max_calls, new_id=new_id)
    if fmt == "required":
        return JsonListParser(sep=",", opener="[", closer="]", arg_keys=("arguments",), max_calls=max_calls,
                              new_id=new_id)
    if fmt.startswith("named:"):
        return NamedParser(fmt[len("named:"):], new_id)
    raise ValueError(f"tool_call_parser must be one of {PARSERS}, got {fmt!r}")
