"""Reasoning out of generated text: `<think>...</think>` to `reasoning_content`, the rest to `content`.

    qwen3        thinking only if the prompt ends inside `<think>` (Qwen3 templates from 2507 on put
                 it there) or the text starts with `<think>`; otherwise all of it is content (as with
                 `enable_thinking: false`, whose prompt already holds an empty think block).
    deepseek_r1  the text always starts inside thinking (a leading `<think>` is skipped): all of it is
                 reasoning until `</think>`.

Read one character at a time like the tool parsers (tool_parser.py), so a stream split
anywhere gives the same pieces. Whitespace around the reasoning, and between `</think>`
and the content, is dropped.
"""

from __future__ import annotations

from radixserve.server.tool_parser import CONTENT, Pieces

REASONING = "reasoning"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether a prompt ending in `prompt_tail` leaves the reply inside a think block."""
    return prompt_tail.rstrip().endswith(THINK_OPEN)


class ReasoningParser:
    """Splits a completion's text into reasoning and content pieces, incrementally."""

    def __init__(self, name: str, *, prompt_tail: str = "") -> None:
        if name not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {name!r}")
        self._open = name == "deepseek_r1" or prompt_opens_thinking(prompt_tail)
        self._state = "start"  # start -> think -> content
        self._held = ""  # start: leading text that may be "<think>"; think: a prefix of "</think>"
        self._space = ""  # think: whitespace held back (dropped before "</think>")
        self._said = False  # think: reasoning text shown yet (leading whitespace is dropped)
        self._out = Pieces()

    def feed(self, text: str) -> Pieces:
        i = 0
        while i < len(text):
            n = self._run(text, i)  # a run read at once, as reading it char by char would
            if n:
                i += n
            else:
                self._char(text[i])
                i += 1
        out, self._out = self._out, Pieces()
        return out

    def _run(self, text: str, i: int) -> int:
        if self._state == "content":
            span = text[i:]
            body = span if self._said else span.lstrip()
            if body:
                self._said = True
                self._out.add(CONTENT, body)
            return len(span)
        if self._state != "think" or self._held:
            return 0
        end = text.find("<", i)
        span = text[i:] if end < 0 else text[i:end]
        body = span if self._said else span.lstrip()
        reasoning = body.rstrip()
        if reasoning:
            self._reason(reasoning)
            self._space += body[len(reasoning):]
        elif self._said:
            self._space += body
        return len(span)

    def finish(self) -> Pieces:
        if self._state == "start":
            self._leave_start(self._held)
        elif self._state == "think":
            self._reason(self._held)
        self._held = self._space = ""
        out, self._out = self._out, Pieces()
        return out

    def _char(self, c: str) -> None:
        if self._state == "content":
            if self._said or not c.isspace():
                self._said = True
                self._out.add(CONTENT, c)
        elif self._state == "start":
            self._held += c
            head = self._held.lstrip()
            if head and THINK_OPEN.startswith(head) and head != THINK_OPEN:
                return
            if head == THINK_OPEN:
                self._held = ""
                self._state = "think"
            elif head:
                held, self._held = self._held, ""
                self._leave_start(held)
        else:
            self._think_char(c)

    def _leave_start(self, held: str) -> None:
        """The text does not open with `<think>`: reasoning if the prompt opened it, else content."""
        if self._open:
            self._state = "think"
            for c in held:
                self._think_char(c)
        else:
            self._state = "content"
            self._said = True
            self._out.add(CONTENT, held)

    def _think_char(self, c: str) -> None:
        if self._held or c == "<":
            if THINK_CLOSE.startswith(self._held + c):
                self._held += c
                if self._held == THINK_CLOSE:
                    self._held = self._space = ""
                    self._state = "content"
                    self._said = False
                return
            held, self._held = self._held, ""
            self._reason(held)
            self._think_char(c)
        elif c.isspace():
            if self._said:
                self._space += c
        else:
            self._reason(c)

    def _reason(self, text: str) -> None:
        if text:
            self._out.add(REASONING, self._space + text)
            self._space = ""
            self._said = True
