"""EngineCore: one thread's worth of engine. `step()` is schedule -> run -> process.

Single-threaded and deterministic, so tests drive it step by step; `Engine`
runs it on a background thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from radixserve.engine.config import EngineConfig, section
from radixserve.engine.structured import fill_bitmask
from radixserve.engine.tp_driver import RankFailure, TPDriver
from radixserve.engine.tp_worker import resolve_device, resolve_dtype, start_runner
from radixserve.model_runner.model_runner import ForwardOutput, HostSample
from radixserve.model_runner.sampler import SamplingBatch, TokenBitmask
from radixserve.model_runner.transfer import to_device
from radixserve.radix_tree import RadixTree
from radixserve.scheduler.batch_builder import ScheduledBatch
from radixserve.scheduler.kv_cache import KVCacheManager
from radixserve.scheduler.request import Req, Submission
from radixserve.scheduler.scheduler import Scheduler, SchedulerConfig, StepUpdate

logger = logging.getLogger(__name__)

# Steps failing one after another without one that runs: past this the engine gives up
# (fatal) rather than failing request after request. Finding the cause among n requests
# takes about log2(n) failed steps; 2,048 running requests take 11.
MAX_FAILED_STEPS_IN_A_ROW = 32


class EngineFatalError(RuntimeError):
    """The engine cannot serve any more: the process should exit and be restarted."""


class _Launched(NamedTuple):
    """A step queued on the device, not yet processed on the host."""

    batch: ScheduledBatch
    out: ForwardOutput
    sampled: HostSample | None
    # A step with structured-output rows launched before the previous step was processed: its
    # sampling waits for that (the grammar masks need the previous tokens) and is queued by
    # `_sample_deferred`, while the forward already runs.
    deferred: SamplingBatch | None = None


class _Sampling(NamedTuple):
    """The sampling tensors of the last step that sampled, and the requests of their rows."""

    reqs: list[Req]
    batch: SamplingBatch


__all__ = ["EngineCore", "EngineFatalError", "resolve_device", "resolve_dtype"]


class EngineCore:
    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        self.config = config
        # Tensor parallelism: this process is rank 0; the driver starts and feeds the others.
        self.tp = TPDriver(config, model_path) if config.tensor_parallel_size > 1 else None
        self.device = resolve_device(config.device) if self.tp is None else self.tp.device
        self.dtype = resolve_dtype(config.dtype, self.device)
        try:
            self.runner, cascade_min_prefix = start_runner(config, model_path, self.device, self.dtype,
                                                           None if self.tp is None else self.tp.comm)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise
        if self.tp is not None:
            self.tp.attach(self.runner.req_to_token)
        self.tree = RadixTree(page_size=config.page_size, policy=config.eviction_policy)
        self.cache = KVCacheManager(
            self.tree,
            self.runner.allocator,
            self.runner.req_to_token,
            enable_prefix_cache=config.enable_prefix_cache,
        )
        self.scheduler = Scheduler(
            section(config, SchedulerConfig, max_context=self.runner.max_context,
                    cascade_min_prefix=cascade_min_prefix),
            self.cache,
            eos_ids=frozenset(self.runner.model_config.eos_token_ids),
        )
        # Overlapped scheduling (see step): None means on for CUDA devices.
        self.overlap = config.overlap_schedule if config.overlap_schedule is not None else self.device.type == "cuda"
        self._inflight: _Launched | None = None
        self._processing: list[Req] | None = None  # the requests of the step being processed
        self.failed_in_a_row = 0
        self._last_sampling: _Sampling | None = None
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.computed_tokens = 0
        self.steps = 0

    @property
    def kv_capacity(self) -> int:
        return self.cache.capacity

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt + output) a request may hold (Scheduler.context_limit)."""
        return self.scheduler.context_limit

    def add(self, reqs: list[Req]) -> None:
        """Queue requests built by the caller (tests, benchmarks); the engine submits."""
        self.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        self.scheduler.add(reqs)

    def submit(self, sub: Submission) -> None:
        self.prompt_tokens += len(sub.prompt_ids) * sub.params.n
        self.scheduler.submit(sub)

    def abort(self, rid: str) -> None:
        self.scheduler.abort(rid)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def step(self) -> list[StepUpdate]:
        """Run one batch; return what each request gained.

        With `overlap_schedule`, a step stays in flight: the next call builds and launches
        the following step first (the tokens it sampled are read on the device), then
        processes this one, so the host's scheduling work runs while the GPU computes.
        Where the next step needs this one's results on the host (Scheduler.can_schedule_ahead),
        it is processed first.

        A step that raises fails only the requests that caused it (Scheduler.recover); the
        others keep their outputs and carry on. Raises EngineFatalError where serving cannot
        go on (the device is lost, the KV bookkeeping cannot be restored, or steps keep failing).
        """
        updates: list[StepUpdate] = []
        try:
            self._step(updates)
        except Exception as exc:
            self._recover(exc)
            updates += self.scheduler.take_updates()
        else:
            self.failed_in_a_row = 0
        if self.config.check_invariants:
            self.scheduler.check_invariants()
        return updates

    def _step(self, updates: list[StepUpdate]) -> None:
        """`step`'s work; `updates` gains each result as soon as it is processed, so that a
        failure later in the step loses none of them."""
        prev = self._inflight
        if prev is not None and not self.scheduler.can_schedule_ahead(prev.batch):
            self._inflight = None
            updates += self._complete(prev)
            prev = None
        if prev is not None:
            batch = self.scheduler.schedule_ahead(prev.batch)
        else:
            batch = self.scheduler.schedule()
        launched = None if batch is None else self._launch(batch, prev)
        if prev is not None:
            self._inflight = None
            updates += self._complete(prev)
        if launched is not None and launched.deferred is not None:
            launched = self._sample_deferred(launched)
        if launched is not None:
            if self.overlap:
                self._inflight = launched
                # Its prefill chunks go into the tree now (tokens and slots are known), so
                # the next step's admission matches them as it would sequentially.
                self.scheduler.commit_chunks(launched.batch)
            else:
                updates += self._complete(launched)
        elif prev is None:
            updates += self.scheduler.take_updates()
        if self.tp is not None:  # steps that launch nothing still keep the other ranks from timing out
            self.tp.heartbeat()

    def _recover(self, exc: Exception) -> None:
        """Put the engine back in a state to serve after a step raised, or raise EngineFatalError."""
        processed, self._processing = self._processing, None
        self._inflight = None  # its results are recomputed: its requests are reset
        self._last_sampling = None
        self.failed_in_a_row += 1
        if isinstance(exc, RankFailure):
            raise EngineFatalError(str(exc)) from exc
        if self._device_lost():
            raise EngineFatalError(f"the {self.device.type} device failed: {exc}") from exc
        if self.failed_in_a_row > MAX_FAILED_STEPS_IN_A_ROW:
            raise EngineFatalError(f"{self.failed_in_a_row} steps in a row failed; the last: {exc!r}") from exc
        logger.warning("a step failed (%s: %s); isolating the requests that caused it", type(exc).__name__, exc,
                       exc_info=exc)
        try:
            self.scheduler.recover(exc, processed)
        except Exception as fatal:
            raise EngineFatalError(f"recovery from a failed step failed: {fatal}") from exc

    def _device_lost(self) -> bool:
        """Whether the device still runs work: a CUDA error (an illegal access, a device-side
        assert) poisons the context, and every later call fails."""
        if self.device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(self.device)
        except Exception:
            return True
        return False

    def _launch(self, batch: ScheduledBatch, prev: _Launched | None) -> _Launched:
        """Queue the batch's forward and sampling; start copying the tokens to the host."""
        if batch.forward.sourced is not None:
            assert prev is not None and prev.sampled is not None, "sourced ids are the previous step's samples"
            batch.forward.input_source = prev.sampled.device.token_ids
        sampling = self._sampling_batch(batch) if batch.sample_reqs else None
        # A grammar's mask needs the previous step's tokens on the host: this step's sampling
        # waits until that step is processed (_step), while its forward runs.
        defer = sampling is not None and prev is not None and any(r.grammar is not None for r in batch.sample_reqs)
        if self.tp is None:
            out = self.runner.forward(batch.forward)
            sampled = None if sampling is None or defer else self._sample(batch, out, sampling)
        else:
            # The sampling tensors first: a request that cannot be sampled fails before the
            # step is sent (recoverable). Once sent, the other ranks run this step: a failure
            # leaves them out of step with rank 0 (their collectives wait for its), so it ends
            # the engine.
            self.tp.send_step(batch.forward, len(batch.sample_reqs))
            try:
                out = self.runner.forward(batch.forward)
                sampled = None if sampling is None or defer else self._sample(batch, out, sampling)
            except Exception as exc:
                self.tp.mark_failed(exc)
                raise RankFailure(f"a tensor-parallel step failed on rank 0: {exc!r}") from exc
        self.steps += 1
        self.computed_tokens += batch.forward.num_tokens
        return _Launched(batch, out, sampled, sampling if defer else None)

    def _sample_deferred(self, launched: _Launched) -> _Launched:
        """Queue the sampling of a launched step whose grammar masks waited for the previous
        step's tokens (now processed: each matcher has accepted its request's output)."""
        assert launched.deferred is not None, "only a deferred step samples here"
        try:
            sampled = self._sample(launched.batch, launched.out, launched.deferred)
        except Exception as exc:
            if self.tp is None:
                raise
            self.tp.mark_failed(exc)  # the other ranks wait for these tokens: as in _launch
            raise RankFailure(f"a tensor-parallel step failed on rank 0: {exc!r}") from exc
        return launched._replace(sampled=sampled, deferred=None)

    def _sample(self, batch: ScheduledBatch, out: ForwardOutput, sampling: SamplingBatch) -> HostSample:
        """Queue the sampling of the step's rows (with their grammar masks) and the copy to the host."""
        bitmask = None
        if any(r.grammar is not None for r in batch.sample_reqs):
            # A request that ended after this step was built decodes once more and its token is
            # dropped (Scheduler.process): its row is left unconstrained.
            grammars = [None if r.finished else r.grammar for r in batch.sample_reqs]
            bits, rows = fill_bitmask(grammars, [r.output_ids for r in batch.sample_reqs], self.runner.vocab_size)
            bitmask = TokenBitmask(to_device(bits, self.device), rows)
        sample = self.runner.sample(out.logits, sampling, bitmask)
        if self.tp is not None:  # rank 0 samples; every rank keeps the tokens (overlapped steps read them)
            self.tp.share_tokens(sample.token_ids)
        return self.runner.to_host(sample)

    @property
    def idle_interval(self) -> float | None:
        """How long the loop may wait for work before calling `idle()` (None: as long as it likes)."""
        return None if self.tp is None else self.tp.heartbeat_interval

    def idle(self) -> list[StepUpdate]:
        """While there is no work: check the other tensor-parallel ranks (EngineFatalError when one
        is gone) and keep them from timing out. Nothing to do without tensor parallelism."""
        if self.tp is not None:
            try:
                self.tp.heartbeat()
            except RankFailure as exc:
                raise EngineFatalError(str(exc)) from exc
        return []

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing without tensor parallelism). Idempotent."""
        tp, self.tp = self.tp, None
        if tp is not None:
            tp.close()

    def _sampling_batch(self, batch: ScheduledBatch) -> SamplingBatch:
        """The step's sampling tensors, built from its rows (a Python loop over requests) only
        when it samples a request that the last sampling step did not.

        A request sampled in both has drawn exactly one token since (a request is sampled
        once per step it runs in, and its seed step counts its draws), and its params and
        seed never change: its row of the last tensors, one step on, is its row now. So
        the last tensors move on (`SamplingBatch.next_step`) when the requests are the
        same, or some of them (the others finished or left); None from next_step (penalties
        or suppressed ids) means a build."""
        last, reqs = self._last_sampling, batch.sample_reqs
        sampling = None
        if any(len(w) > 1 for r in reqs for w in r.bad_words_ids):
            # A multi-token bad word bans its last token only after the others: which ids a row
            # suppresses depends on the tokens drawn since, though no id may be suppressed now.
            last = None
        if last is not None and last.reqs == reqs:  # the common case: one add on the device
            sampling = last.batch.next_step()
        elif last is not None:
            row_of = {id(r): i for i, r in enumerate(last.reqs)}
            keep = [row_of[id(r)] for r in reqs if id(r) in row_of]
            if len(keep) == len(reqs):  # every request was sampled last time
                sampling = last.batch.next_step(keep)
        if sampling is None:
            rows = self.scheduler.sampling_rows(batch)
            sampling = SamplingBatch.build(rows, self.runner.vocab_size, self.device)
        self._last_sampling = _Sampling(reqs, sampling)
        return sampling

    def _complete(self, launched: _Launched) -> list[StepUpdate]:
        sampled = None if launched.sampled is None else launched.sampled.wait()
        # If processing raises, these requests' results are half applied: they fail (recover).
        self._processing = [r for r in launched.batch.reqs if not r.finished]
        updates = self.scheduler.process(launched.batch, launched.out, sampled)
        self._processing = None
        self.generated_tokens += sum(len(u.token_ids) for u in updates)
        return updates

    def flush_cache(self) -> bool:
        return self.cache.flush()

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()

    def stats(self) -> dict[str, Any]:
        tree = self.tree.stats()
        cache = self.cache
        queried = cache.queried_tokens
        return {
            "queried_tokens": queried,
            "hit_tokens": cache.hit_tokens,
            "hit_rate": cache.hit_tokens / queried if queried else 0.0,
            "cache_tokens": self.tree.total_size,
            "evictable_tokens": self.tree.evictable_size,
            "protected_tokens": self.tree.protected_size,
            "inserted_tokens": tree.get("inserted_tokens", 0),
            "evicted_tokens": tree.get("evicted_tokens", 0),
            "free_slots": self.runner.allocator.num_free,
            "kv_capacity_tokens": self.kv_capacity,
            "kv_usage": 1.0 - self.runner.allocator.num_free / self.kv_capacity,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "computed_tokens": self.computed_tokens,
            "retractions": self.scheduler.retractions,
            "cascade_batches": self.scheduler.cascade_batches,
            "folded_tokens": self.scheduler.folded_tokens,
            # Rows computed over tokens planned (prefill chunks and decodes); 1.0: nothing folded.
            "fold_ratio": 1.0 - self.scheduler.folded_tokens / max(1, self.scheduler.planned_tokens),
            "steps": self.steps,
            "failed_steps": self.scheduler.failed_steps,  # steps that raised (their causes failed)
            # Attention kernel variants compiled after start (each stalls a step; fa4 only).
            "attention_compiles": self.runner.backend.compiles,
            "graph_steps": self.runner.graph_batches,  # decode steps that replayed a CUDA graph
            "piecewise_steps": self.runner.piecewise_batches,  # other steps that replayed graph pieces
        }
