"""A request as the scheduler sees it: tokens, KV ownership, and progress.

Slots of a running request (page size 1 shown):

    fill_ids  = prompt_ids + output_ids
    positions   0 ........ cache_len ........ kv_len ...... len(fill_ids)
    slots       [ tree-owned, locked ][ private ]
                                                ^ tokens not yet computed
                                                  (the last sampled token's K/V
                                                   is computed in the next step)

`slots[:cache_len]` belong to the radix tree and are protected by the lock on
`last_node`; `slots[cache_len:kv_len]` are the request's private tail. When a
prefill chunk completes, or the request finishes, is retracted or aborted, the
tail is inserted into the tree (`KVCacheManager.commit`) and the lock moves to
the new node.

`fill_ids`, `output_ids` and `slots` are `array('q')`s, not lists: the collector
traverses a list item by item on every full pass, and 1,024 live requests of
2,000+ tokens made each pass ~100 ms (an array is one object to it). Slice
them for views (`np.frombuffer(req.slots[a:b])`): an array that exports its
buffer cannot grow.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from radixserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

# How an embed request pools the final hidden states: its last token's (a cached prefix is
# reused), the mean over its tokens, or its first token's (both recompute every token).
POOLINGS = ("last", "mean", "cls")


class PromptLogprob(NamedTuple):
    """One prompt token's logprob under the model given the tokens before it."""

    logprob: float
    rank: int  # tokens at least as likely as this one (1: the argmax)
    top: tuple[tuple[int, float], ...]  # (token_id, logprob) of the most likely, most likely first


def token_array(ids: Iterable[int] = ()) -> array:
    """Token ids or slot ids as int64 (see the module docstring)."""
    return array("q", ids)


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer(Protocol):
    """What the scheduler needs of an incremental detokenizer (engine.detokenizer)."""

    matched_stop: str | None

    def append(self, token_ids: list[int]) -> Any: ...  # -> (delta_text, stopped)

    def flush(self) -> Any: ...  # -> (delta_text, stopped)


class Grammar(Protocol):
    """What the scheduler needs of a request's structured-output matcher (engine.structured).

    Invariant: it has accepted exactly the request's `output_ids`. The scheduler keeps it
    by accepting each token right before appending it (Scheduler._append_token)."""

    def accept(self, token_id: int) -> None: ...  # raises ValueError if the grammar forbids it

    def is_terminated(self) -> bool: ...

    def sync(self, output_ids: Sequence[int]) -> None: ...  # restore the invariant (roll back, accept)

    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...  # the tokens allowed next, packed bits


@dataclass
class PrefillTask:
    """A request that only prefills: an embedding pooled from the final hidden states
    (`pooling` in POOLINGS), or the logprob of each token from `score_start` on. The
    results accumulate over the prompt's chunks and restart if the request is reset."""

    kind: str  # "embed" | "score"
    pooling: str = "last"
    score_start: int = 0
    embedding: torch.Tensor | None = None  # running sum (mean) or the pooled row
    scores: list[float] = field(default_factory=list)

    def restart(self) -> None:
        self.embedding, self.scores = None, []


class Submission(NamedTuple):
    """One prompt as the engine hands it over; the scheduler makes its requests
    (`Scheduler.submit`: one per completion, `params.n` of them)."""

    rid: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int  # completion 0's; the others derive theirs from it
    detokenizer: Callable[[], Detokenizer | None]  # a fresh one per completion
    prefill: PrefillTask | None = None  # an embed or score request (n is 1): where its results go
    grammar: Callable[[], Grammar | None] = lambda: None  # a fresh matcher per completion (structured)
    # params.bad_words as token sequences (each completed sequence is forbidden).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()


class Req:
    """One sequence to generate (a prompt with n > 1 becomes n of these)."""

    def __init__(
        self,
        rid: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        seed: int,
        index: int = 0,
        detokenizer: Detokenizer | None = None,
        namespace: Hashable = None,
        wait_for: Req | None = None,
        prefill: PrefillTask | None = None,
        grammar: Grammar | None = None,
        bad_words_ids: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        self.rid = rid
        self.index = index  # which of the n completions of its prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.detokenizer = detokenizer
        self.namespace = namespace
        # Where its tokens go in the radix tree (set on admission): `namespace`, or with the
        # prefix cache off a namespace of its own or its fold family's (scheduler/kv_cache.py).
        self.tree_namespace: Hashable = namespace
        # A sibling (n > 1) waits until the first one's prompt is in the tree,
        # so it is served from the cache instead of computing the prompt again.
        self.wait_for = wait_for
        # None: the request samples tokens ("generate"); else it only prefills (embed, score).
        self.prefill = prefill
        # The structured output's matcher (see Grammar for its invariant); None: unconstrained.
        self.grammar = grammar
        self.bad_words_ids = bad_words_ids

        self.output_ids = token_array()
        # prompt + output, kept as one growing array: read several times per step.
        self.fill_ids = token_array(prompt_ids)
        self.output_logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = []
        # params.prompt_logprobs, computed by completion 0 of a prompt (its siblings' are the same):
        # (logprob, rank, top) of prompt tokens 1, 2, ... in order, appended as its chunks run.
        # Complete once it holds len(prompt_ids) - 1 entries; a reset before that empties it.
        self.prompt_logprobs: list[PromptLogprob] | None = None
        if params.prompt_logprobs is not None and index == 0 and prefill is None:
            self.prompt_logprobs = []
        self.status = ReqStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: str | None = None  # why it failed (finish_reason "error")
        self.stop_reason: int | str | None = None
        self.aborted = False

        # KV state (see the module docstring).
        self.row: int | None = None
        self.slots = token_array()  # slot of each computed (or this step's) token
        self.kv_len = 0
        self.cache_len = 0
        self.last_node: Any = None
        # Tree fold mode: slots[cache_len:borrowed_len] point at a same-batch
        # donor's slots; the donor owns them until both are committed.
        self.borrowed_len = 0

        self.cached_tokens = 0  # prompt tokens matched in the tree at first admission
        self.folded_tokens = 0  # tokens computed by another sequence of the same batch
        self.admitted_once = False
        self.arrival_step = 0
        self.retractions = 0

    @property
    def task(self) -> str:
        """"generate", or the prefill task's kind ("embed", "score")."""
        return "generate" if self.prefill is None else self.prefill.kind

    @property
    def fill_len(self) -> int:
        return len(self.fill_ids)

    @property
    def table_row(self) -> int:
        """`row` of a request that holds one (from admission to release)."""
        if self.row is None:
            raise RuntimeError(f"request {self.rid}#{self.index} holds no request-table row")
        return self.row

    def append_output(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.fill_ids.append(token_id)

    @property
    def remaining_new_tokens(self) -> int:
        if self.task != "generate":
            return 0
        return max(0, self.params.max_tokens - len(self.output_ids))

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Asks for prompt logprobs that are not all computed yet."""
        lps = self.prompt_logprobs
        return lps is not None and len(lps) < len(self.prompt_ids) - 1

    def reset_prompt_logprobs(self) -> None:
        """The request goes back to waiting: incomplete prompt logprobs restart with its prefill."""
        if self.prompt_logprobs_pending:
            self.prompt_logprobs = []

    @property
    def match_limit(self) -> int:
        """How many leading tokens may come from the cache: the rows whose
        outputs are needed must be computed (the KV cache keeps no hidden states).
        Prompt logprobs need every prompt position's logits: nothing is matched."""
        if self.prompt_logprobs_pending:
            return 0
        task = self.prefill
        if task is not None and task.kind == "score":
            return max(0, task.score_start - 1)
        if task is not None and task.pooling != "last":
            return 0
        return self.fill_len - 1

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def ready(self) -> bool:
        """May be admitted now (a sibling waits for its first's prompt)."""
        w = self.wait_for
        return w is None or w.finished or w.kv_len >= len(w.prompt_ids)

    def __repr__(self) -> str:
        return (
            f"Req({self.rid}#{self.index}, {self.status.value}, prompt={len(self.prompt_ids)}, "
            f"out={len(self.output_ids)}, kv={self.kv_len}, cache={self.cache_len})"
        )
