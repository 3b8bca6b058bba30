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


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a token the model rules out) as -9999.0, as vLLM sends it."""
    return max(logprob, -9999.0)


def first(top: tuple[tuple[int, float], ...], k: int | None) -> tuple[tuple[int, float], ...]:
    """The first k alternatives of a position's (most likely first); -1 or None: all of them."""
    return top if k is None or k == -1 else top[:k]


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
    prompt_ids_sent: bool = False  # streaming with return_token_ids: its prompt's ids went out


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
        chat_role: str = "assistant",
        prompt_ids: list[list[int]] | None = None,
        return_token_ids: bool = False,
        continuous_usage: bool = False,
        tokens_as_ids: bool = False,
        request_id: str | None = None,
        echo_logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        output: OutputFormat | None = None,
    ) -> None:
        self.route = route  # "completions" | "chat"
        self.model = model
        self.n = n
        self.token_text = token_text
        # What logprobs show for a token: its text, or vLLM's "token_id:N" (return_tokens_as_token_ids).
        self.token_label: Callable[[int], str] = (lambda t: f"token_id:{t}") if tokens_as_ids else token_text
        self.echo_texts = echo_texts
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # the usage so far on every chunk
        self.logprobs = logprobs
        self.chat_role = chat_role  # the role of the reply (vLLM: the last message's without a generation prompt)
        self.prompt_ids = prompt_ids or []  # each prompt's token ids
        self.return_token_ids = return_token_ids  # prompt_token_ids and token_ids in the answer
        # Completions with echo and logprobs: the top-N (-1: all) shown for each echoed prompt token.
        self.echo_logprobs = echo_logprobs
        self.prompt_logprobs = prompt_logprobs  # vLLM's prompt_logprobs field: its top-N; None: not asked
        self.prompt_lps: list[tuple[TokenLogprob | None, ...] | None] = [None] * len(prompt_lens)
        self._echoed: set[int] = set()  # streamed echo with logprobs: choices whose prompt part went out
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + (request_id or uuid.uuid4().hex)
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
        if delta.prompt_logprobs is not None:
            self.prompt_lps[prompt_index] = delta.prompt_logprobs
        if delta.index == 0:  # a prompt's cached tokens are those of its first completion
            self.usage.cached_tokens += delta.cached_tokens - self._cached[prompt_index]
            self._cached[prompt_index] = delta.cached_tokens
        self.usage.completion_tokens += len(delta.token_ids)
        return choice

    # -- whole responses ---------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.route == "chat":
            choices = [self._chat_choice(c) for c in self.choices]
            obj = "chat.completion"
            if self.prompt_logprobs is not None:  # vLLM puts a chat's beside its choices
                extra["prompt_logprobs"] = self._vllm_prompt_logprobs(0)
        else:
            choices = [self._completion_choice(c) for c in self.choices]
            obj = "text_completion"
        body = {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "system_fingerprint": None, "choices": choices, "usage": self.usage.body(), **extra,
        }
        if self.route == "chat" and self.return_token_ids:
            body["prompt_token_ids"] = self.prompt_ids[0]
        return body

    def _completion_ids(self, choice: Choice, token_ids: list[int]) -> dict[str, Any]:
        """return_token_ids on completions: the choice's prompt ids (once per stream) and `token_ids`."""
        if not self.return_token_ids:
            return {}
        ids: dict[str, Any] = {"token_ids": list(token_ids)}
        if not choice.prompt_ids_sent:
            ids["prompt_token_ids"] = self.prompt_ids[choice.index // self.n]
        return ids

    def _completion_choice(self, c: Choice) -> dict[str, Any]:
        logprobs = None
        if self.logprobs:
            if self.echo_logprobs is not None:
                logprobs = self._echoed_logprobs(c)[0]
            else:  # c.offset is still the echoed prompt's length: only streaming advances it
                logprobs = self._completion_logprobs(c.logprobs, c.offset)[0]
        choice = {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                  **self._completion_ids(c, c.token_ids)}
        if self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._vllm_prompt_logprobs(c.index // self.n)
        return choice

    def _chat_choice(self, c: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.chat_role, "content": c.text, "refusal": None}
        finish_reason = c.finish_reason
        if self.output is not None:
            message, called = self.output.message(c.text)
            finish_reason = _finish_reason(finish_reason, called)
        choice = {"index": c.index, "message": message, "finish_reason": finish_reason,
                  "logprobs": self._chat_logprobs(c.logprobs) if self.logprobs else None}
        if self.return_token_ids:
            choice["token_ids"] = c.token_ids
        return choice

    # -- stream chunks -----------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                 "system_fingerprint": None, "choices": choices}
        if self.continuous_usage:
            chunk["usage"] = self.usage.body()
        elif self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat: the role for every choice (the first chunk carries the prompt's ids when asked), then
        the echoed last message if any; completions with echo: the prompt text."""
        chunks = []
        if self.route == "chat":
            for c in self.choices:
                chunk = self._chunk([{"index": c.index, "delta": {"role": self.chat_role, "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                if self.return_token_ids and c.index == 0:
                    chunk["prompt_token_ids"] = self.prompt_ids[0]
                chunks.append(chunk)
            if self.echo_texts and self.echo_texts[0]:
                chunks += [self._chunk([{"index": c.index, "delta": {"content": c.text}, "logprobs": None,
                                         "finish_reason": None}]) for c in self.choices]
        elif self.echo_texts and self.echo_logprobs is None:  # with logprobs, the echo waits for the prompt's
            for c in self.choices:
                chunks.append(self._chunk([{"index": c.index, "text": c.text, "logprobs": None,
                                            "finish_reason": None, **self._completion_ids(c, [])}]))
                c.prompt_ids_sent = True
        return chunks

    def delta_chunks(self, prompt_index: int, delta: StreamDelta) -> list[dict[str, Any]]:
        """Accumulate `delta` and return its chunks (none when it carries nothing to show; several
        when the reply's parser splits it, e.g. into content and a tool call)."""
        choice = self.add(prompt_index, delta)
        if self.echo_logprobs is not None and choice.index not in self._echoed:
            chunk = self._echo_chunk(prompt_index)
            return [] if chunk is None else [chunk]
        lps = list(delta.logprobs or ())
        ids = self.return_token_ids and bool(delta.token_ids)  # token ids to show, even without text
        if self.route != "chat":
            if not delta.text and not lps and delta.finish_reason is None and not ids:
                return []
            logprobs = None
            if lps:
                logprobs, choice.offset = self._completion_logprobs(lps, choice.offset)
            body = {"index": choice.index, "text": delta.text, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason, **self._completion_ids(choice, list(delta.token_ids))}
            choice.prompt_ids_sent = True
            return [self._chunk([body])]
        finish_reason = delta.finish_reason
        if self._parsers:
            parser = self._parsers[choice.index]
            bodies = parser.feed(delta.text, last=finish_reason is not None)
            finish_reason = _finish_reason(finish_reason, parser.called)
        else:
            bodies = [{"content": delta.text}] if delta.text else []
        if not bodies and (lps or finish_reason is not None or ids):
            bodies = [{}]
        chunks = []
        for j, body in enumerate(bodies):
            entry = {
                "index": choice.index, "delta": body,
                "logprobs": self._chat_logprobs(lps) if lps and j == 0 else None,
                "finish_reason": finish_reason if j == len(bodies) - 1 else None,
            }
            if ids and j == 0:
                entry["token_ids"] = list(delta.token_ids)
            chunks.append(self._chunk([entry]))
        return chunks

    def _echo_chunk(self, prompt_index: int) -> dict[str, Any] | None:
        """Streamed echo with logprobs: once the prompt's logprobs are here (on its first
        completion's first delta), one chunk opens every choice of the prompt not opened yet with
        the prompt's text and logprobs and what the choice generated so far; None before."""
        if self.prompt_lps[prompt_index] is None:
            return None  # the choices accumulate meanwhile
        bodies = []
        for c in self.choices[prompt_index * self.n : (prompt_index + 1) * self.n]:
            if c.index in self._echoed:
                continue
            self._echoed.add(c.index)
            logprobs, c.offset = self._echoed_logprobs(c)
            bodies.append({"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return self._chunk(bodies) if bodies else None

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = self.usage.body()
        return chunk

    # -- logprobs ----------------------------------------------------------------------------

    def _completion_logprobs(self, lps: list[TokenLogprob], start: int) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy logprobs object, and the text offset after its last token."""
        tokens, offsets, offset = [], [], start
        for lp in lps:
            tokens.append(self.token_label(lp.token_id))
            offsets.append(offset)
            offset += len(self.token_text(lp.token_id))  # offsets into the text, whatever the labels
        body = {
            "tokens": tokens,
            "token_logprobs": [finite(lp.logprob) for lp in lps],
            "top_logprobs": [{self.token_label(t): finite(v) for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }
        return body, offset

    def _echoed_logprobs(self, c: Choice) -> tuple[dict[str, list[Any]], int]:
        """Echo with logprobs: the prompt's tokens, then the choice's generated ones so far, offsets
        from the prompt's start; and the offset after them."""
        prompt, offset = self._echo_logprobs(c.index // self.n)
        body, offset = self._completion_logprobs(c.logprobs, offset)
        return {key: prompt[key] + body[key] for key in prompt}, offset

    def _echo_logprobs(self, prompt_index: int) -> tuple[dict[str, list[Any]], int]:
        """The echoed prompt's part of a completion's logprobs (the first token has none: null) and
        the text offset after it."""
        ids = self.prompt_ids[prompt_index]
        entries = self.prompt_lps[prompt_index] or (None,) * len(ids)
        k = self.echo_logprobs
        tokens, offsets, offset = [], [], 0
        for token_id in ids:
            tokens.append(self.token_label(token_id))
            offsets.append(offset)
            offset += len(self.token_text(token_id))  # offsets into the text, whatever the labels
        body: dict[str, list[Any]] = {
            "tokens": tokens,
            "token_logprobs": [None if e is None else finite(e.logprob) for e in entries],
            "top_logprobs": [None if e is None else {self.token_label(t): finite(v) for t, v in first(e.top, k)}
                             for e in entries],
            "text_offset": offsets,
        }
        return body, offset

    def _vllm_prompt_logprobs(self, prompt_index: int) -> list[dict[int, dict[str, Any]] | None]:
        """vLLM's prompt_logprobs: None for the first token, then token id -> {logprob, rank,
        decoded_token} for the prompt's token and its position's top N."""
        out: list[dict[int, dict[str, Any]] | None] = []
        for e in self.prompt_lps[prompt_index] or ():
            if e is None:
                out.append(None)
                continue
            entry = {e.token_id: {"logprob": finite(e.logprob), "rank": e.rank,
                                  "decoded_token": self.token_text(e.token_id)}}
            for rank, (t, v) in enumerate(first(e.top, self.prompt_logprobs), start=1):
                entry.setdefault(t, {"logprob": finite(v), "rank": rank, "decoded_token": self.token_text(t)})
            out.append(entry)
        return out

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_label(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in lps],
            "refusal": None,
        }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """A reply that made tool calls and stopped by itself finished with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason
