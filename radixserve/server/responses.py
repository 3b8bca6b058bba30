"""OpenAI-compatible response bodies and stream chunks, built from the engine's StreamDeltas.

One `ResponseBuilder` per HTTP request accumulates each choice (choice index =
prompt index * n + completion index) and renders the whole response, or one
chunk per delta when streaming. Logprobs come from the engine as token ids and
raw log-probabilities; token strings come from the tokenizer (`TokenText`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixserve.engine.outputs import StreamDelta, TokenLogprob
from radixserve.server.chat_output import ChatOutputParser, OutputFormat


class TokenText:
    """Token id -> its text, as OpenAI shows it in logprobs (memoized; ids repeat a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tokenizer is None:
                text = f"<{token_id}>"
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 1 << 18:
                self._cache[token_id] = text
        return text


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    offset: int = 0  # characters before the next token (completions' text_offset)
    folded_tokens: int = 0  # prompt tokens computed by another sequence of the batch


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class ResponseBuilder:
    """Accumulates choices for one completions/chat request and renders responses or chunks."""

    def __init__(
        self,
        route: str,
        model: str,
        n: int,
        prompt_lens: list[int],
        token_text: Callable[[int], str],
        *,
        echo_texts: list[str] | None = None,
        include_usage: bool = False,
        logprobs: bool = False,
        output: OutputFormat | None = None,
    ) -> None:
        self.route = route  # "completions" | "chat"
        self.model = model
        self.n = n
        self.token_text = token_text
        self.echo_texts = echo_texts
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(index=i) for i in range(n * len(prompt_lens))]
        if echo_texts:
            for c in self.choices:
                c.text = echo_texts[c.index // n]
                c.offset = len(c.text)
        self.usage = Usage(prompt_tokens=sum(prompt_lens))
        self._cached = [0] * len(prompt_lens)
        # Chat with tool calls or reasoning: how each choice's text is read (and, streaming, its parser).
        self.output = output
        self._parsers: list[ChatOutputParser] = [output.parser() for _ in self.choices] if output else []

    # -- accumulation ------------------------------------------------------------------------

    def add(self, prompt_index: int, delta: StreamDelta) -> Choice:
        choice = self.choices[prompt_index * self.n + delta.index]
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
        choice.folded_tokens = delta.folded_tokens
        if delta.index == 0:  # a prompt's cached tokens are those of its first completion
            self.usage.cached_tokens += delta.cached_tokens - self._cached[prompt_index]
            self._cached[prompt_index] = delta.cached_tokens
        self.usage.completion_tokens += len(delta.token_ids)
        return choice

    # -- whole responses ---------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        if self.route == "chat":
            choices = [self._chat_choice(c) for c in self.choices]
            obj = "chat.completion"
        else:
            choices = [
                {
                    "index": c.index,
                    "text": c.text,
                    # c.offset is still the echoed prompt's length: only streaming advances it.
                    "logprobs": self._completion_logprobs(c.logprobs, c.offset)[0] if self.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in self.choices
            ]
            obj = "text_completion"
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "system_fingerprint": None, "choices": choices, "usage": self.usage.body(),
        }

    def _chat_choice(self, c: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        finish_reason = c.finish_reason
        if self.output is not None:
            message, called = self.output.message(c.text)
            finish_reason = _finish_reason(finish_reason, called)
        return {"index": c.index, "message": message,
                "logprobs": self._chat_logprobs(c.logprobs) if self.logprobs else None, "finish_reason": finish_reason}

    # -- stream chunks -----------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                 "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat: the assistant role for every choice; completions with echo: the prompt text."""
        if self.route == "chat":
            return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]) for c in self.choices]
        if self.echo_texts:
            return [self._chunk([{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": None}])
                    for c in self.choices]
        return []

    def delta_chunks(self, prompt_index: int, delta: StreamDelta) -> list[dict[str, Any]]:
        """Accumulate `delta` and return its chunks (none when it carries nothing to show; several
        when the reply's parser splits it, e.g. into content and a tool call)."""
        choice = self.add(prompt_index, delta)
        lps = list(delta.logprobs or ())
        if self.route != "chat":
            if not delta.text and not lps and delta.finish_reason is None:
                return []
            logprobs = None
            if lps:
                logprobs, choice.offset = self._completion_logprobs(lps, choice.offset)
            return [self._chunk([{"index": choice.index, "text": delta.text, "logprobs": logprobs,
                                  "finish_reason": delta.finish_reason}])]
        finish_reason = delta.finish_reason
        if self._parsers:
            parser = self._parsers[choice.index]
            bodies = parser.feed(delta.text, last=finish_reason is not None)
            finish_reason = _finish_reason(finish_reason, parser.called)
        else:
            bodies = [{"content": delta.text}] if delta.text else []
        if not bodies and (lps or finish_reason is not None):
            bodies = [{}]
        chunks = []
        for j, body in enumerate(bodies):
            chunks.append(self._chunk([{
                "index": choice.index, "delta": body,
                "logprobs": self._chat_logprobs(lps) if lps and j == 0 else None,
                "finish_reason": finish_reason if j == len(bodies) - 1 else None,
            }]))
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = self.usage.body()
        return chunk

    # -- logprobs ----------------------------------------------------------------------------

    def _completion_logprobs(self, lps: list[TokenLogprob], start: int) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy logprobs object, and the text offset after its last token."""
        tokens, offsets, offset = [], [], start
        for lp in lps:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        body = {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }
        return body, offset

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in lps],
            "refusal": None,
        }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """A reply that made tool calls and stopped by itself finished with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason
