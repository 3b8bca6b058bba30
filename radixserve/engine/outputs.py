"""What the engine returns: whole results and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw: fp32 log_softmax of the logits), and the
    top-N alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    rank: int | None = None  # prompt tokens: how many tokens are at least as likely (1: the argmax)


@dataclass
class CompletionOutput:
    """One of the `n` completions of a prompt."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it, if any
    error: str | None = None  # with finish_reason "error": what failed inside the engine


@dataclass
class RequestOutput:
    """The result of one prompt. `text`, `token_ids`, ... are those of the first completion."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0  # prompt tokens served from the radix tree
    folded_tokens: int = 0  # prompt tokens computed once for several sequences of a batch
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # precedes it), as vLLM returns them.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass(frozen=True)
class StreamDelta:
    """What one completion gained in one step; the last delta of a completion has `finish_reason`."""

    request_id: str
    index: int  # which of the n completions
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # tokens of this completion so far
    folded_tokens: int = 0  # this completion's prompt tokens computed by another sequence
    stop_reason: int | str | None = None
    error: str | None = None  # with finish_reason "error": what failed inside the engine
    # The prompt's logprobs (RequestOutput.prompt_logprobs), on completion 0's first delta after
    # its prompt is computed; None on every other delta.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
