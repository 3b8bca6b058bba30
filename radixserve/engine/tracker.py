"""Per-request delivery: collect a prompt's n completions and hand each delta to a sink.

A sink is any callable taking a StreamDelta, `DONE` when the request ends, or
an exception when the engine loop failed: a thread-safe queue's `put`, or a
function feeding an asyncio queue through `call_soon_threadsafe`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

from radixserve.engine.outputs import CompletionOutput, RequestOutput, StreamDelta, TokenLogprob
from radixserve.scheduler.request import PrefillTask, PromptLogprob
from radixserve.scheduler.scheduler import StepUpdate

DONE = object()  # sentinel closing a sink


class Tracker:
    """Collects one prompt's n completions and forwards each delta to a sink."""

    def __init__(
        self, rid: str, prompt: str | None, prompt_ids: Sequence[int], n: int, sink: Callable, *, stream: bool = True,
        prefill: PrefillTask | None = None,
    ) -> None:
        self.rid = rid
        self.prefill = prefill  # an embed or score request's results, filled in by the scheduler
        # stream False: the sink hears only the end (DONE, or a failure), never a delta; callers
        # that want the whole result skip a delta object and a consumer wake-up per token.
        self.stream = stream
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.outputs = [CompletionOutput(index=i) for i in range(n)]
        self.sink = sink
        self.cached_tokens = 0
        self.folded = [0] * n
        self.remaining = n
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def on_update(self, u: StepUpdate) -> None:
        req = u.req
        out = self.outputs[req.index]
        out.text += u.text
        out.token_ids.extend(u.token_ids)
        wants_logprobs = req.params.logprobs is not None
        lps: tuple[TokenLogprob, ...] = ()
        if wants_logprobs:  # runs for every token of every request: build these only where asked for
            lps = tuple(TokenLogprob(t, lp, top) for t, lp, top in u.logprobs)
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.extend(lps)
        prompt_lps = None
        if req.index == 0:
            self.cached_tokens = req.cached_tokens
            if self.prompt_logprobs is None and req.prompt_logprobs is not None and not req.prompt_logprobs_pending:
                prompt_lps = self._take_prompt_logprobs(req.prompt_logprobs)
        self.folded[req.index] = req.folded_tokens
        if u.finished:
            out.finish_reason = req.finish_reason
            out.stop_reason = req.stop_reason
            out.error = req.error
            self.remaining -= 1
        if not self.stream:
            return
        self.sink(
            StreamDelta(
                request_id=self.rid,
                index=req.index,
                text=u.text,
                token_ids=tuple(u.token_ids),
                logprobs=lps if wants_logprobs else None,
                finish_reason=out.finish_reason if u.finished else None,
                prompt_tokens=len(self.prompt_ids),
                cached_tokens=req.cached_tokens,
                completion_tokens=len(out.token_ids),
                folded_tokens=req.folded_tokens,
                stop_reason=out.stop_reason if u.finished else None,
                error=out.error if u.finished else None,
                prompt_logprobs=prompt_lps,
            )
        )

    def _take_prompt_logprobs(self, entries: Sequence[PromptLogprob]) -> tuple[TokenLogprob | None, ...]:
        """The request's prompt logprobs as the output shows them: None for the first token."""
        ids = self.prompt_ids
        lps = (None, *(TokenLogprob(ids[i + 1], e.logprob, e.top, e.rank) for i, e in enumerate(entries)))
        self.prompt_logprobs = list(lps)
        return lps

    def result(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.rid,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_ids),
            outputs=self.outputs,
            cached_tokens=self.cached_tokens,
            folded_tokens=sum(self.folded),
            prompt_logprobs=self.prompt_logprobs,
        )


def next_delta(got: object) -> StreamDelta | None:
    """What a sink delivered: a delta, None once the request is done; a failure is raised."""
    if got is DONE:
        return None
    if isinstance(got, BaseException):
        raise RuntimeError("the engine loop failed") from got
    return got  # type: ignore[return-value]


def drain(q: queue.SimpleQueue) -> None:
    while next_delta(q.get()) is not None:
        pass
