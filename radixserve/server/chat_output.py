"""A chat reply's text as OpenAI shows it: reasoning, content and tool calls, whole or as stream deltas.

The reasoning parser (reasoning.py) runs first; its content goes through the tool call
parser (tool_parser.py). A stream's deltas are OpenAI's: `{"reasoning_content"}`,
`{"content"}`, a call's first delta `{"tool_calls": [{"index", "id", "type", "function":
{"name", "arguments": ""}}]}`, then `{"tool_calls": [{"index", "function": {"arguments"}}]}`
fragments. A reply that made calls and stopped by itself finishes with "tool_calls".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.server.reasoning import REASONING, ReasoningParser
from radixserve.server.tool_formats import make_parser
from radixserve.server.tool_parser import ARGS, CALL, CONTENT, Piece, Pieces, ToolParser, parse_whole


@dataclass(frozen=True)
class OutputFormat:
    """How a chat request's replies are read; one parser per choice."""

    tools: str | None = None  # tool_parser.make_parser's format; None: no tool calls are read
    max_calls: int | None = None  # 1 without parallel_tool_calls
    reasoning: str | None = None  # a reasoning parser's name, or None
    prompt_tail: str = ""  # the prompt's last characters (does it open a think block?)

    def parser(self) -> ChatOutputParser:
        return ChatOutputParser(self)

    def _reasoning(self) -> ReasoningParser | None:
        return ReasoningParser(self.reasoning, prompt_tail=self.prompt_tail) if self.reasoning else None

    def _tools(self) -> ToolParser | None:
        return make_parser(self.tools, max_calls=self.max_calls) if self.tools else None

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """A whole reply's message, and whether it made tool calls."""
        reasoning: str | None = None
        content = text
        splitter = self._reasoning()
        if splitter is not None:
            pieces = splitter.feed(text) + splitter.finish()
            reasoning = "".join(p.text for p in pieces if p.kind == REASONING) or None
            content = "".join(p.text for p in pieces if p.kind == CONTENT)
        calls: list[dict[str, Any]] = []
        tools = self._tools()
        if tools is not None:
            parsed = parse_whole(tools, content)
            content, calls = parsed.content, parsed.calls
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else content),
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        if self.reasoning:
            message["reasoning_content"] = reasoning
        return message, bool(calls)


class ChatOutputParser:
    """One choice's stream: text in, OpenAI deltas out."""

    def __init__(self, fmt: OutputFormat) -> None:
        self._reasoning = fmt._reasoning()
        self._tools = fmt._tools()

    @property
    def called(self) -> bool:
        return self._tools is not None and self._tools.calls > 0

    def feed(self, text: str, *, last: bool = False) -> list[dict[str, Any]]:
        """The deltas that `text` makes (with `last`: and the end of the reply)."""
        if self._reasoning is None:
            first: list[Piece] = [Piece(CONTENT, text)]
        else:
            first = self._reasoning.feed(text) + (self._reasoning.finish() if last else [])
        pieces = Pieces()
        for p in first:
            if p.kind == CONTENT and self._tools is not None:
                for q in self._tools.feed(p.text):
                    pieces.add(q.kind, q.text, q.index, q.call_id)
            else:
                pieces.add(p.kind, p.text)
        if last and self._tools is not None:
            for q in self._tools.finish():
                pieces.add(q.kind, q.text, q.index, q.call_id)
        return deltas(pieces)


def deltas(pieces: list[Piece]) -> list[dict[str, Any]]:
    """Stream deltas for `pieces`: reasoning and content that follow each other share one."""
    out: list[dict[str, Any]] = []
    for p in pieces:
        if p.kind == CALL:
            out.append({"tool_calls": [{"index": p.index, "id": p.call_id, "type": "function",
                                        "function": {"name": p.text, "arguments": ""}}]})
        elif p.kind == ARGS:
            out.append({"tool_calls": [{"index": p.index, "function": {"arguments": p.text}}]})
        else:
            key = "reasoning_content" if p.kind == REASONING else "content"
            if out and "tool_calls" not in out[-1] and key not in out[-1]:
                out[-1][key] = p.text
            else:
                out.append({key: p.text})
    return out
