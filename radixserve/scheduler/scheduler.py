"""Continuous batching: which tokens of which requests run in the next step.

Each step: reap aborted requests; make room for every running request's next
token (retracting requests when even eviction cannot); then admit waiting
requests in policy order while the prefill token budget, the table rows and
the KV pool (free + evictable, minus a reserve for running requests' expected
output) allow. Long prompts are computed in chunks across steps.

With overlapped scheduling (`schedule_ahead`) the next step is built before
the last one's sampled tokens reach the host: those requests decode them on
the device, and the rest is planned as above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from radixserve.model_runner.forward_batch import ForwardOutput, SampleOutput, SamplingRow
from radixserve.sampling_params import top_count
from radixserve.scheduler.batch_builder import ScheduledBatch, SharedSlots, build_batch, build_decode_ahead
from radixserve.scheduler.kv_cache import KVCacheManager
from radixserve.scheduler.policy import order_waiting
from radixserve.scheduler.recovery import Quarantine
from radixserve.scheduler.request import PromptLogprob, Req, ReqStatus, Submission

logger = logging.getLogger(__name__)


class StepUpdate(NamedTuple):
    """What one request gained in a step (tokens, text), and whether it ended."""

    req: Req
    token_ids: list[int]
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]
    text: str
    finished: bool


_ORDER_POSITIONS = (0, 32, 128, 512, 2048, 8192, 32768)


def _prefix_order(req: Req) -> tuple[int, ...]:
    """Sort key putting requests that share a prefix's KV slots (cached, or borrowed from a
    same-batch donor) side by side, longer shared prefixes closer: the slots at a few
    positions, compared in order. Their attention then reads the shared K/V from L2. The
    sort is stable, so admission order holds within a group."""
    slots = req.slots
    return tuple(slots[p] for p in _ORDER_POSITIONS if p < len(slots))


def _describe(exc: BaseException) -> str:
    """A failure as a request's error message: its type and first 300 characters."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def banned_by_bad_words(seqs: Sequence[Sequence[int]], output_ids: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens end `output_ids` (vLLM's rule: a bad
    word may not be completed); a one-token word is always banned."""
    banned = []
    n = len(output_ids)
    for seq in seqs:
        k = len(seq) - 1
        if k == 0 or (n >= k and all(output_ids[n - k + j] == seq[j] for j in range(k))):
            banned.append(seq[-1])
    return banned


def _ends_by_length(req: Req, fill_limit: int, pending: int = 0) -> bool:
    """Whether the request is done by length once `pending` more sampled tokens are
    appended (max_tokens reached, or no room for another token)."""
    return len(req.output_ids) + pending >= req.params.max_tokens or len(req.fill_ids) + pending >= fill_limit


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's section of EngineConfig (engine/config.py: defaults and help), with
    `max_context` resolved from the model and `cascade_min_prefix` 0 where cascade attention
    is off."""

    max_running_requests: int
    max_prefill_tokens: int
    max_context: int
    schedule_policy: str
    lpm_aging_tokens_per_step: int
    fold_mode: str
    fold_threshold: float
    batch_order: str
    cascade_min_prefix: int  # plan cascade attention over prefixes this long; 0: never


# SGLang's new-token ratio: the share of a running request's remaining max_tokens reserved
# when admitting others. It decays while memory holds and jumps back after a retraction.
NEW_TOKEN_RATIO_INIT = 0.7
NEW_TOKEN_RATIO_MIN = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCacheManager, eos_ids: frozenset[int]) -> None:
        self.config = config
        self.cache = cache
        self.eos_ids = eos_ids
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.step_count = 0
        self.new_token_ratio = NEW_TOKEN_RATIO_INIT
        self.retractions = 0
        self.folded_tokens = 0
        self.planned_tokens = 0  # tokens of prefill chunks and decodes, before folding
        self.cascade_batches = 0  # batches whose attention ran as a cascade
        self._updates: list[StepUpdate] = []  # produced outside process() (aborts, failures)
        self.quarantine = Quarantine()  # suspects of a failed step (scheduler/recovery.py)
        # Tokens a request may hold (prompt + output): past it there is no room for the next
        # token's K/V, in the context or in the whole pool. The one place this is computed.
        self.context_limit = min(config.max_context, cache.capacity)
        self.failed_steps = 0
        self._reorder = False  # running changed in a way that may break batch_order
        self._shared = SharedSlots()  # cascade planning's memo of slots shared with a neighbour

    # -- queue management ------------------------------------------------------------

    def submit(self, sub: Submission) -> list[Req]:
        """Queue a prompt's requests, one per completion. Completion 0 keeps the submission's
        seed and the others derive theirs; with the prefix cache on, a sibling waits until the
        first has its prompt in the tree (Req.wait_for), to be served from the cache."""
        reqs: list[Req] = []
        for i in range(sub.params.n):
            seed = sub.seed if i == 0 else (sub.seed * 1_000_003 + i) & (2**62 - 1)
            first = reqs[0] if reqs and self.cache.enable_prefix_cache else None
            reqs.append(Req(sub.rid, sub.prompt_ids, sub.params, seed=seed, index=i, detokenizer=sub.detokenizer(),
                            wait_for=first, prefill=sub.prefill, grammar=sub.grammar(),
                            bad_words_ids=sub.bad_words_ids))
        self.add(reqs)
        return reqs

    def add(self, reqs: list[Req]) -> None:
        for r in reqs:
            r.arrival_step = self.step_count
        self.waiting.extend(reqs)

    def abort(self, rid: str) -> None:
        """Mark every sequence of request `rid`; they end at the next step boundary."""
        for r in self.waiting + self.running:
            if r.rid == rid:
                r.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._updates)

    def take_updates(self) -> list[StepUpdate]:
        out, self._updates = self._updates, []
        return out

    # -- building a batch ------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        self.step_count += 1
        self._reap_aborted()
        cleared = self.quarantine.passed()
        if self.quarantine.active:  # the next probe runs alone
            for req in cleared:
                self._retract(req)
        self._make_room_for_running()
        return self._schedule({})

    def _schedule(self, sourced: dict[int, int]) -> ScheduledBatch | None:
        """Plan every running request's next tokens, admit what fits, build the batch.

        `sourced`: id(req) -> row of the previous step's sampled tokens, for the requests
        whose newest token the host has not seen yet (schedule_ahead). Each decodes it,
        unless it was its last (by length)."""
        if self._reorder and self.config.batch_order == "prefix":
            # Only admissions and commits change the order (removing keeps a list sorted).
            self.running.sort(key=_prefix_order)
            self._reorder = False
        plan: list[tuple[Req, int]] = []
        budget = self.config.max_prefill_tokens
        room = self.cache.available()
        fill_limit = self._fill_limit()
        sampled_ahead = len(sourced)  # sampled tokens not yet appended, one per request
        for req in self.running:
            if id(req) in sourced:
                if _ends_by_length(req, fill_limit, pending=1):
                    del sourced[id(req)]  # that token is its last: `process` finishes it
                    continue
                n = 1
            elif req.fill_len - req.kv_len == 1:  # a decode: not charged to the prefill budget
                n = 1
            else:  # the next chunk of a long prompt
                n = min(req.fill_len - req.kv_len, budget, room)
                budget -= n
            if n > 0:
                plan.append((req, n))
                room -= n
        self._admit(plan, budget, sampled_ahead)
        if not plan:
            return None
        batch = build_batch(
            plan, self.cache, self.config.fold_mode, self.config.fold_threshold, self.config.cascade_min_prefix,
            sourced, self._shared,
        )
        self.cache.sync_table()
        self.cascade_batches += batch.forward.cascade is not None
        self.planned_tokens += sum(batch.extend_lens)
        self.folded_tokens += sum(batch.folded)
        for req, k in zip(batch.reqs, batch.folded):
            req.folded_tokens += k
        return batch

    # -- overlapped steps ------------------------------------------------------------

    def can_schedule_ahead(self, prev: ScheduledBatch) -> bool:
        """Whether the next step may be built before `prev`'s results are processed.

        What the next step needs of `prev` is known on the host but its sampled tokens,
        which the next step reads on the device, and its stop-token and stop-string ends
        (such a request decodes once more and `process` drops that token). Prefill chunks
        are committed to the tree when `prev` is launched (`commit_chunks`), so admission
        sees the same tree as sequentially. It falls back (the caller processes `prev` first) where
        more is needed: anything aborted; embeddings and scores; a request of `prev`
        whose next sampling reads its newest token (penalties, min_tokens); a request
        that `prev` ends by length (or by its prompt, with max_tokens 0) while others
        wait (its row and slots free up only once processed: admit in order); and a
        pool that cannot give every running request a slot without retracting."""
        if self._updates or self.quarantine.active:
            return False
        if any(r.aborted for r in self.waiting):
            return False
        for req in self.running:
            if req.aborted or req.task != "generate":
                return False
        if self.waiting:
            fill_limit = self._fill_limit()
            if any(_ends_by_length(r, fill_limit, pending=1) for r in prev.sample_reqs):
                return False
            if any(r.params.max_tokens == 0 and r.kv_len >= len(r.prompt_ids) for r in prev.reqs):
                return False  # prev ends it (max_tokens 0): likewise
        for req in prev.sample_reqs:
            p = req.params
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                return False
            if len(req.output_ids) + 1 < p.min_tokens:
                return False
            if any(len(w) > 1 for w in req.bad_words_ids):  # which words are banned depends on that token
                return False
        return self.cache.available() >= len(self.running)

    def schedule_ahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The step after `prev`, built before `prev`'s tokens reach the host.

        Each request `prev` sampled decodes that token, read on the device (its row of
        `prev`'s sampled tokens); one that the token ends by length is left out; one it
        ends by a stop token or string is not known yet: it decodes once more and
        `process` drops that token. A run of plain decode steps with nothing to admit
        takes a shorter path (build_decode_ahead). `prev`'s prefill chunks are in the tree
        already: the caller commits them when it launches `prev` (EngineCore.step)."""
        self.step_count += 1
        members = {id(r) for r in prev.sample_reqs}
        if prev.is_plain_decode and not self._could_admit() and all(id(r) in members for r in self.running):
            return self._decode_ahead(prev)
        sourced = {id(r): i for i, r in enumerate(prev.sample_reqs) if not r.finished}
        return self._schedule(sourced)

    def _could_admit(self) -> bool:
        return bool(self.waiting) and len(self.running) < self.config.max_running_requests

    def _decode_ahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        fill_limit = self._fill_limit()
        reqs, rows = [], []
        for i, req in enumerate(prev.sample_reqs):
            if req.finished or _ends_by_length(req, fill_limit, pending=1):
                continue  # prev's token is its last
            reqs.append(req)
            rows.append(i)
        if self.running:  # as _admit does when nothing waits
            self._decay_new_token_ratio()
        if not reqs:
            return None
        batch = build_decode_ahead(reqs, rows, self.cache, self.config.cascade_min_prefix, self._shared)
        self.cache.sync_table()
        self.cascade_batches += batch.forward.cascade is not None
        self.planned_tokens += len(reqs)
        return batch

    def _make_room_for_running(self) -> None:
        """Retract running requests until each can compute at least one token this step."""
        while self.running and len(self.running) > self.cache.available():
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            self._retract(victim)
            victim.retractions += 1
            self.retractions += 1
            logger.info("retracted %r: the KV pool is full", victim)

    def _retract(self, req: Req) -> None:
        """Back to the front of the queue; what it computed goes to the tree (its retry is cheap)."""
        self.running.remove(req)
        self.cache.release(req)
        self._requeue([req])

    def _requeue(self, reqs: list[Req]) -> None:
        for req in reqs:
            req.status = ReqStatus.WAITING
            if req.prefill is not None:
                req.prefill.restart()  # its results restart with it
            req.reset_prompt_logprobs()
        self.waiting[:0] = reqs
        self.new_token_ratio = NEW_TOKEN_RATIO_INIT

    def _reserved(self, sampled_ahead: int = 0) -> float:
        """Slots held back for running requests' output; `sampled_ahead` of those tokens
        are sampled already (not yet appended: schedule_ahead)."""
        return (sum(r.remaining_new_tokens for r in self.running) - sampled_ahead) * self.new_token_ratio

    def _admit(self, plan: list[tuple[Req, int]], budget: int, sampled_ahead: int = 0) -> None:
        cfg = self.config
        tree = self.cache.tree if self.cache.enable_prefix_cache else None
        order = order_waiting(
            self.waiting, cfg.schedule_policy, tree, self.step_count, cfg.lpm_aging_tokens_per_step
        )
        reserved = self._reserved(sampled_ahead)
        pending = sum(n for _, n in plan)  # tokens already planned this step come first
        admitted: list[Req] = []
        for req in order:
            if budget <= 0 or len(self.running) + len(admitted) >= cfg.max_running_requests:
                break
            if not self.quarantine.admits(req):
                continue
            if not req.ready() and not self.quarantine.in_probe(req):  # a probe must not wait on others
                continue
            if not self.cache.admit(req):
                break
            extend = req.fill_len - req.kv_len
            need = extend + req.remaining_new_tokens * self.new_token_ratio
            room = self.cache.available() - pending - reserved
            alone = not self.running and not admitted
            if need > room and not (alone and extend <= self.cache.available() - pending):
                self.cache.undo_admit(req)
                break
            n = min(extend, budget)
            budget -= n
            pending += n
            reserved += need - n  # this step's chunk is pending; the rest of the prompt and output later
            plan.append((req, n))
            admitted.append(req)
        for req in admitted:
            self.waiting.remove(req)
            req.status = ReqStatus.RUNNING
            self.running.append(req)
            self._reorder = True
        if self.running and not admitted:
            self._decay_new_token_ratio()

    def _decay_new_token_ratio(self) -> None:
        """A step that admitted nothing while requests run: reserve a little less for them."""
        self.new_token_ratio = max(NEW_TOKEN_RATIO_MIN, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)

    def sampling_rows(self, batch: ScheduledBatch) -> list[SamplingRow]:
        """Each sampled request's row; one of `batch.ahead` has a sampled token not yet
        appended (the seed's step counts it)."""
        rows = []
        for req in batch.sample_reqs:
            ahead = id(req) in batch.ahead
            p = req.params
            suppressed: set[int] = set()
            if len(req.output_ids) + ahead < p.min_tokens:
                suppressed.update(p.stop_token_ids)
                if not p.ignore_eos:
                    suppressed |= self.eos_ids
            if req.bad_words_ids:  # multi-token words are never ahead (can_schedule_ahead)
                suppressed.update(banned_by_bad_words(req.bad_words_ids, req.output_ids))
            suppress = tuple(sorted(suppressed))
            rows.append(
                SamplingRow(
                    params=p,
                    token_history=req.fill_ids,
                    output_ids=req.output_ids,
                    seed=req.seed,
                    step=len(req.output_ids) + ahead,
                    suppress_ids=suppress,
                )
            )
        return rows

    # -- after the forward pass ------------------------------------------------------

    def process(self, batch: ScheduledBatch, out: ForwardOutput, sampled: SampleOutput | None) -> list[StepUpdate]:
        """Account computed tokens, append sampled ones, then commit, then finish.

        Every prefill chunk is committed to the tree at once, so requests
        sharing the prompt (n > 1 siblings, concurrent users) reuse it, and
        slots shared inside the batch (tree folding) get one owner. All commits
        come before any release: a request ending now must not take slots to
        the free list that a borrower still points at.
        """
        updates: list[StepUpdate] = []
        finishing: list[tuple[Req, str]] = []
        if sampled is not None and batch.sample_reqs:
            updates += self._append_tokens(batch, sampled, finishing)
        self._collect_prefill_results(batch, out, finishing, updates)
        self.commit_chunks(batch)  # requests ending now too: their release must not free a borrower's slots
        for req, reason in finishing:
            self._finish(req, reason)
        # Taken last: if anything above raises, these (aborts) are still here for `recover`.
        return self.take_updates() + updates

    def commit_chunks(self, batch: ScheduledBatch) -> None:
        """Insert the batch's prefill chunks into the tree (once: the list is emptied).

        Only the tokens and slots are read, so this may run before the forward has computed
        them (EngineCore.step, right after the launch): a later step that reads those slots
        runs after it on the device. A commit's re-pointing at the tree's copies reaches the table at the next
        sync_table, after the batch was launched over its own slots."""
        for req in batch.commits:
            self.cache.commit(req)
            self._reorder = True
        batch.commits.clear()

    def _append_tokens(
        self, batch: ScheduledBatch, sampled: SampleOutput, finishing: list[tuple[Req, str]]
    ) -> list[StepUpdate]:
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        updates = []
        fill_limit = self._fill_limit()
        for i, req in enumerate(batch.sample_reqs):
            if req.finished:  # stopped a step earlier, after this overlapped step was launched
                continue
            try:
                updates.append(self._append_token(req, token_ids[i], i, logprobs, top_ids, top_lps, fill_limit,
                                                  finishing))
            except Exception as exc:  # this request's own bookkeeping (e.g. its detokenizer): it alone fails
                logger.exception("processing the token of %r failed", req)
                req.error = _describe(exc)
                finishing.append((req, "error"))  # released with the others, after the commits
                updates.append(StepUpdate(req, [], [], "", True))
        return updates

    def _append_token(
        self, req: Req, tok: int, i: int, logprobs: list | None, top_ids: list | None, top_lps: list | None,
        fill_limit: int, finishing: list[tuple[Req, str]],
    ) -> StepUpdate:
        if req.grammar is not None:  # before appending: the matcher holds exactly output_ids
            req.grammar.accept(tok)
        req.append_output(tok)
        lp: list = []
        if req.params.logprobs is not None and logprobs is not None:
            k = req.params.logprobs
            top: tuple[tuple[int, float], ...] = ()
            if k and top_ids is not None and top_lps is not None:
                k = top_count(k, len(top_ids[i]))
                top = tuple(zip(top_ids[i][:k], top_lps[i][:k]))
            entry = (tok, logprobs[i], top)
            req.output_logprobs.append(entry)
            lp = [entry]
        text = ""
        stopped_by_string = False
        if req.detokenizer is not None:
            text, stopped_by_string = req.detokenizer.append([tok])
        reason = self._finish_reason(req, tok, stopped_by_string, fill_limit)
        if reason is not None:
            if req.detokenizer is not None and not stopped_by_string:
                text += req.detokenizer.flush().delta_text
            finishing.append((req, reason))
        return StepUpdate(req, [tok], lp, text, reason is not None)

    def _collect_prefill_results(
        self, batch: ScheduledBatch, out: ForwardOutput, finishing: list, updates: list[StepUpdate]
    ) -> None:
        """Embeddings and scores: gather this chunk's rows; finish after the last chunk."""
        for req in batch.reqs:
            task = req.prefill
            if task is None:  # generate
                self._collect_prompt_logprobs(req, batch, out)
                if req.params.max_tokens == 0 and req.kv_len >= len(req.prompt_ids) and not req.finished:
                    text = req.detokenizer.flush().delta_text if req.detokenizer is not None else ""
                    finishing.append((req, "length"))  # its prompt is computed: nothing to sample
                    updates.append(StepUpdate(req, [], [], text, True))
                continue
            if task.kind == "embed" and out.hidden is not None and id(req) in batch.hidden_spans:
                a, b = batch.hidden_spans[id(req)]
                if b > a:
                    rows = out.hidden[a:b].sum(dim=0).cpu()
                    task.embedding = rows if task.embedding is None else task.embedding + rows
            if task.kind == "score" and out.scores is not None and id(req) in batch.score_spans:
                a, b = batch.score_spans[id(req)]
                task.scores.extend(out.scores.logprobs[a:b].tolist())
            if req.kv_len == req.fill_len:
                finishing.append((req, "stop"))
                updates.append(StepUpdate(req, [], [], "", True))

    @staticmethod
    def _collect_prompt_logprobs(req: Req, batch: ScheduledBatch, out: ForwardOutput) -> None:
        """Append this chunk's prompt logprobs (its span of the score rows) to the request's."""
        span = batch.score_spans.get(id(req))
        if span is None or out.scores is None or req.prompt_logprobs is None:
            return
        a, b = span
        if b <= a:
            return
        scores = out.scores
        assert scores.ranks is not None, "prompt logprob rows come with ranks"
        logprobs = scores.logprobs[a:b].tolist()
        ranks = scores.ranks[a:b].tolist()
        k = top_count(req.params.prompt_logprobs or 0, scores.top_ids.shape[1] if scores.top_ids is not None else 0)
        tops: list[tuple[tuple[int, float], ...]] = [()] * (b - a)
        if k and scores.top_ids is not None and scores.top_logprobs is not None:
            ids = scores.top_ids[a:b, :k].tolist()
            lps = scores.top_logprobs[a:b, :k].tolist()
            tops = [tuple(zip(i, v)) for i, v in zip(ids, lps)]
        req.prompt_logprobs.extend(PromptLogprob(lp, r, t) for lp, r, t in zip(logprobs, ranks, tops))

    def _finish_reason(self, req: Req, tok: int, stopped_by_string: bool, fill_limit: int) -> str | None:
        p = req.params
        if tok in p.stop_token_ids:
            req.stop_reason = tok
            return "stop"
        if not p.ignore_eos and tok in self.eos_ids:
            return "stop"
        if stopped_by_string:
            assert req.detokenizer is not None, "stop strings are matched by the detokenizer"
            req.stop_reason = req.detokenizer.matched_stop
            return "stop"
        if req.grammar is not None and req.grammar.is_terminated():  # its end-of-sequence token was accepted
            return "stop"
        if _ends_by_length(req, fill_limit):
            return "length"
        return None

    def _fill_limit(self) -> int:
        return self.context_limit

    def _finish(self, req: Req, reason: str) -> None:
        req.finish_reason = reason
        req.status = ReqStatus.FINISHED
        self._shared.forget(req)
        if req in self.running:
            self.running.remove(req)
        if req.row is not None:
            self.cache.release(req)

    def _reap_aborted(self) -> None:
        for req in [r for r in self.waiting + self.running if r.aborted]:
            if req in self.waiting:
                self.waiting.remove(req)
            text = req.detokenizer.flush().delta_text if req.detokenizer is not None else ""
            self._finish(req, "abort")
            self._updates.append(StepUpdate(req, [], [], text, True))

    # -- failed steps ----------------------------------------------------------------

    def recover(self, exc: BaseException, processed: list[Req] | None = None) -> None:
        """A step raised: reset every request holding KV state, and end the cause with an error.

        `processed`: the requests whose results were being processed when it raised (their
        tokens may be half appended, so they end with an error); None when it raised before
        (scheduling, the forward, sampling): then the quarantine narrows the suspects down
        and ends a request only once a step it ran alone failed (scheduler/recovery.py).
        Raises RuntimeError where the KV bookkeeping cannot be restored (fatal)."""
        self.failed_steps += 1
        message = _describe(exc)
        seen: set[int] = set()
        holders: list[Req] = []
        for req in self.running + self.waiting + (processed or []):
            if id(req) not in seen and (req.row is not None or req.last_node is not None or len(req.slots)):
                seen.add(id(req))
                holders.append(req)
        self.running = []
        self.waiting = [r for r in self.waiting if id(r) not in seen]
        self.cache.discard(holders)
        self._reorder = True
        if processed is not None:
            causes = processed
        else:
            cause = self.quarantine.on_failure(holders)
            causes = [] if cause is None else [cause]
        for req in causes:
            logger.error("request %s failed: %s", req.rid, message)
            req.error = message
            req.finish_reason = "error"
            req.status = ReqStatus.FINISHED
            self._shared.forget(req)
            self._updates.append(StepUpdate(req, [], [], "", True))
        self._requeue([r for r in holders if not r.finished])

    # -- checks ----------------------------------------------------------------------

    def check_invariants(self) -> None:
        holders = [r for r in self.running if r.row is not None]
        self.cache.check(holders)
        for r in self.waiting:
            if r.row is not None or len(r.slots) or r.last_node is not None:
                raise RuntimeError(f"waiting request {r} holds KV state")
