"""The public Engine: validation, a background loop thread, sync/streaming/asyncio APIs.

Requests are validated in the caller's thread (a bad one raises ValueError and
nothing is enqueued), then handed to the loop thread, which owns the
`EngineCore` and runs `step()` while there is work. Results flow back through
per-request sinks (a thread-safe queue, or an asyncio queue fed with
`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import queue
import random
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any

from tqdm.auto import tqdm

from radixserve.engine.config import EngineConfig
from radixserve.engine.core import EngineCore
from radixserve.engine.detokenizer import IncrementalDetokenizer
from radixserve.engine.model_files import load_tokenizer, resolve_model_path
from radixserve.engine.outputs import RequestOutput, StreamDelta
from radixserve.engine.structured import GrammarCompilers, RequestGrammar, bad_word_ids
from radixserve.engine.tracker import DONE, Tracker, drain, next_delta
from radixserve.sampling_params import SamplingParams, check_text, top_count
from radixserve.scheduler.request import POOLINGS, PrefillTask, Submission
from radixserve.scheduler.scheduler import StepUpdate

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
_PREFILL_PARAMS = SamplingParams(max_tokens=1)  # embed/score requests sample nothing


class ContextLengthError(ValueError):
    """A prompt that leaves no room for an output token (`length` >= `limit`)."""

    def __init__(self, message: str, *, length: int, limit: int) -> None:
        super().__init__(message)
        self.length = length
        self.limit = limit


# apply_chat_template's own arguments: not template variables a client may set.
_CHAT_TEMPLATE_ARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


# What a chat message may hold (Engine.apply_chat_template).
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"})


class Engine:
    """An LLM engine with a persistent prefix cache.

    >>> engine = Engine()  # the built-in SmolLM2-135M-Instruct on CPU
    >>> engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        enable_prefix_cache: bool = True,
        **config: Any,
    ) -> None:
        self.config = EngineConfig.from_kwargs(
            model=model, device=device, dtype=dtype, enable_prefix_cache=enable_prefix_cache, **config
        )
        model_path = resolve_model_path(self.config.model, self.config.show_progress)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.core = EngineCore(self.config, model_path)
        self._stats = self.core.stats()
        self._rng = random.Random(self.config.seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the core: held for each step
        self._cv = threading.Condition()  # guards the inbox and wakes the loop
        self._inbox: list[tuple[Tracker, Submission]] = []
        self._aborts: list[str] = []
        self._trackers: dict[str, Tracker] = {}
        self._stopping = False
        self._shut_down = False  # shutdown() was called (the loop may have stopped before, on a failure)
        self._error: BaseException | None = None
        self._grammars: GrammarCompilers | None = None  # structured output (built on first use)
        self._grammar_lock = threading.Lock()
        if self.core.device.type == "cuda":
            # What start-up made (torch, compiled kernels, weights' modules) lives as long as
            # the engine: out of the collector's full passes, which otherwise walk it all and
            # stalled a 25 ms decode step for ~0.5 s about once a run (vLLM and SGLang do this).
            gc.collect()
            gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="radixserve-engine", daemon=True)
        self._thread.start()

    # -- context management ----------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Abort what is in flight and stop the loop thread. Idempotent."""
        with self._cv:
            if self._shut_down:
                return
            self._shut_down = True
            if not self._stopping:
                self._stopping = True
                self._aborts.extend(self._trackers)
                self._cv.notify_all()
        # A loop that failed may still be stopping the tensor-parallel ranks: wait for it too.
        self._thread.join(timeout=60)
        if not self._thread.is_alive():  # the loop no longer touches the runner
            self.core.close()  # the other tensor-parallel ranks, if any
            self.core.runner.release_memory()
        if self.core.device.type == "cuda":
            gc.unfreeze()  # what this engine held may now be collected (cycles included)

    # -- submitting ------------------------------------------------------------------

    def _prepare(self, prompt: Prompt, params: SamplingParams | None) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt; raise ValueError naming the problem."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            check_text("prompt", prompt)
            tok = self._require_tokenizer("text prompts")
            ids = tok.encode(prompt, add_special_tokens=True)
            text: str | None = prompt
        else:
            if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
                raise ValueError(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
            ids = list(prompt)
            text = None
            # Checked with C-level passes (map, min, max): a Python loop over a long
            # prompt's ids cost ~1 ms per 2,000 tokens at submission. bool is not int here.
            if not set(map(type, ids)) <= {int}:
                raise ValueError("prompt token ids must be integers")
        self.check_prompt_ids(ids)
        self.check_params(params)
        return text, ids, params

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt + output) a request may hold: the model's context or the KV
        pool, whichever is smaller. A prompt must leave room for one output token."""
        return self.core.context_limit

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        """A prompt the engine can run: non-empty, ids inside the vocabulary, shorter than
        `context_limit`. Raises ValueError; the one check, for `Engine` and the server alike."""
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.core.runner.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = [t for t in ids if not 0 <= t < vocab]
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        limit = self.context_limit
        if len(ids) >= limit:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens; the limit is {limit - 1} "
                f"(context {self.core.max_context}, KV cache {self.core.kv_capacity} tokens)",
                length=len(ids), limit=limit,
            )

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone, against this model: token ids inside its
        vocabulary, stop strings and bad words only with a tokenizer, a structured output that
        compiles (it is compiled here, once: later requests reuse it). Raises ValueError
        naming the field."""
        vocab = self.core.runner.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} token ids must be in [0, {vocab}), got {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        cap = self.config.max_logprobs
        limit = vocab if cap == -1 else cap
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and top_count(k, vocab) > limit:
                raise ValueError(f"{name} asks for {'the whole vocabulary' if k == -1 else k} per position; this "
                                 f"engine's max_logprobs allows at most {limit}")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer; this model has none")
        if params.bad_words and params.allowed_token_ids is not None:
            always = {seq[0] for seq in bad_word_ids(self.tokenizer, params.bad_words) if len(seq) == 1}
            if always >= set(params.allowed_token_ids):
                raise ValueError("bad_words forbid every token of allowed_token_ids")
        if params.structured is not None:
            self._grammar_compilers("structured").compile(params.structured)

    def _grammar_compilers(self, what: str) -> GrammarCompilers:
        """The engine's grammar compiler, built on first use (it reads the whole vocabulary)."""
        with self._grammar_lock:
            if self._grammars is None:
                tok = self._require_tokenizer(what)
                eos = self.core.runner.model_config.eos_token_ids
                self._grammars = GrammarCompilers(tok, self.core.runner.vocab_size, eos)
            return self._grammars

    def _constraints(self, params: SamplingParams) -> dict[str, Any]:
        """The Submission's grammar factory and bad-word token sequences for `params`."""
        out: dict[str, Any] = {}
        if params.structured is not None:
            compilers = self._grammar_compilers("structured")
            compiled = compilers.compile(params.structured)  # cached by check_params
            out["grammar"] = functools.partial(RequestGrammar, compiled, compilers.vocab_size)
        if params.bad_words:
            out["bad_words_ids"] = bad_word_ids(self._require_tokenizer("bad_words"), params.bad_words)
        return out

    def _detokenizer(self, ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    def _submit(
        self,
        items: list[tuple[str | None, list[int], SamplingParams]],
        sink_for: Callable,
        prefill: Callable[[], PrefillTask] | None = None,
        *,
        stream: bool = True,
    ) -> list[Tracker]:
        """Hand each prompt to the loop thread as a Submission (the scheduler makes its
        requests); `prefill` makes each one's task for embed and score requests."""
        if self._error is not None:
            raise RuntimeError("the engine loop failed earlier") from self._error
        trackers = []
        batch = []
        for text, prompt_ids, params in items:
            rid = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            # A tuple of ints is untracked by the collector once a pass has seen it; a list's
            # items are visited by every full collection while the request lives (at 1,024
            # requests of 2,176 tokens, each such list adds ~10 ms to a full pass).
            ids = tuple(prompt_ids)
            seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
            sub = Submission(rid, ids, params, seed, functools.partial(self._detokenizer, ids, params),
                             None if prefill is None else prefill(), **self._constraints(params))
            tracker = Tracker(rid, text, ids, params.n, sink_for(rid), stream=stream, prefill=sub.prefill)
            trackers.append(tracker)
            batch.append((tracker, sub))
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            for tracker, _ in batch:
                self._trackers[tracker.rid] = tracker
            self._inbox.extend(batch)
            self._cv.notify_all()
        return trackers

    def abort(self, request_id: str) -> None:
        """End a request early; its completions finish with finish_reason "abort"."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify_all()

    # -- the loop thread -------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as exc:  # fatal: callers must not be left waiting forever
            logger.critical("the engine loop stopped: %s", exc, exc_info=exc)
            self._fail_all(exc)
            try:
                self.core.close()  # no tensor-parallel rank outlives a failed engine
            except Exception:
                logger.exception("stopping the tensor-parallel ranks failed")

    def _iterate(self) -> bool:
        """One pass: take new requests and aborts, run a step, deliver. False: stop."""
        with self._cv:
            while not (self._inbox or self._aborts or self._stopping or self.core.has_work()):
                if not self._cv.wait(self.core.idle_interval):
                    break  # idle for a while: core.idle() below
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            stopping = self._stopping
        with self._lock:
            for _, sub in inbox:
                self.core.submit(sub)
            for rid in aborts:
                self.core.abort(rid)
            updates = self.core.step() if self.core.has_work() else self.core.idle()
            self._stats = self.core.stats()
        self._dispatch(updates)
        if stopping and not self.core.has_work():
            self._close_all()
            return False
        return True

    def _dispatch(self, updates: list[StepUpdate]) -> None:
        for u in updates:
            tracker = self._trackers.get(u.req.rid)
            if tracker is None:
                continue
            try:
                tracker.on_update(u)
                if tracker.remaining == 0:
                    tracker.sink(DONE)
            except Exception:  # the consumer is gone (e.g. its event loop closed): drop it
                logger.debug("dropping the consumer of %s", tracker.rid, exc_info=True)
                self.abort(tracker.rid)
                tracker.remaining = 0
            if tracker.remaining == 0:
                with self._cv:
                    self._trackers.pop(tracker.rid, None)

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        with self._cv:
            trackers, self._trackers = list(self._trackers.values()), {}
            self._stopping = True
        for t in trackers:
            try:
                t.sink(exc)
            except Exception:  # that consumer is gone too
                pass

    def _close_all(self) -> None:
        with self._cv:
            trackers, self._trackers = list(self._trackers.values()), {}
        for t in trackers:
            try:
                t.sink(DONE)
            except Exception:  # that consumer is gone already
                pass

    # -- public generation APIs ------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in the prompts' order."""
        items = self._prepare_many(prompts, params)
        sinks: dict[str, queue.SimpleQueue] = {}

        def sink_for(rid: str) -> Callable:
            sinks[rid] = queue.SimpleQueue()
            return sinks[rid].put

        trackers = self._submit(items, sink_for, stream=False)
        self._wait(trackers, sinks, progress, "generate")
        return [t.result() for t in trackers]

    def _wait(self, trackers: list[Tracker], sinks: dict[str, queue.SimpleQueue], progress: bool, what: str) -> None:
        bar = tqdm(total=len(trackers), desc=what, disable=not progress, unit="req")
        try:
            for t in trackers:
                drain(sinks[t.rid])
                bar.update(1)
        finally:
            bar.close()

    def _run_prefill(
        self, items: list[tuple[str | None, list[int], SamplingParams]], prefill: Callable[[], PrefillTask]
    ) -> list[PrefillTask]:
        """Submit prefill-only requests (embed, score), wait for them, return their tasks' results."""
        sinks: dict[str, queue.SimpleQueue] = {}

        def sink_for(rid: str) -> Callable:
            sinks[rid] = queue.SimpleQueue()
            return sinks[rid].put

        trackers = self._submit(items, sink_for, prefill, stream=False)
        self._wait(trackers, sinks, False, "prefill")
        for t in trackers:
            out = t.outputs[0]
            if out.finish_reason == "abort":
                raise RuntimeError(f"request {t.rid} was aborted")
            if out.finish_reason == "error":
                raise RuntimeError(f"request {t.rid} failed inside the engine: {out.error}")
        return [t.prefill for t in trackers if t.prefill is not None]

    def embed(
        self, inputs: Prompt | Sequence[Prompt], *, pooling: str = "last", normalize: bool = True
    ) -> list[list[float]]:
        """One embedding per input from the final hidden states (after the last norm).

        `last` (what Qwen3-Embedding uses) reads the last token, so a cached
        prefix is reused; `mean` and `cls` need every (the first) token's hidden
        state, which the KV cache does not keep, so those tokens are recomputed
        (still folded with the batch, and inserted into the tree for others).
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        items = self._prepare_many(inputs, None)
        tasks = self._run_prefill(
            [(text, ids, _PREFILL_PARAMS) for text, ids, _ in items], lambda: PrefillTask("embed", pooling=pooling)
        )
        out = []
        for task, (_, ids, _) in zip(tasks, items):
            vec = task.embedding
            assert vec is not None, "a finished embed task holds its embedding"
            if pooling == "mean":
                vec = vec / len(ids)
            if normalize:
                vec = vec / vec.norm().clamp_min(1e-12)
            out.append(vec.tolist())
        return out

    def score(self, prompt: Prompt, completions: Sequence[Prompt]) -> list[list[float]]:
        """Per-token logprobs of each completion given the prompt (raw model distribution).

        The GRPO case: many completions of one prompt. The prompt is computed
        once (cache and folding) and only the completions' rows are scored.
        """
        if isinstance(completions, (str, bytes)) or not isinstance(completions, (list, tuple)) or not completions:
            raise ValueError("completions must be a non-empty list of strings or token-id lists")
        _, prompt_ids, _ = self._prepare(prompt, None)
        items = []
        for i, c in enumerate(completions):
            if isinstance(c, str):
                if not c:
                    raise ValueError(f"completions[{i}] is empty")
                check_text(f"completions[{i}]", c)
                c_ids = self._require_tokenizer("text completions").encode(c, add_special_tokens=False)
            elif isinstance(c, Sequence) and not isinstance(c, bytes):
                c_ids = list(c)
            else:
                raise ValueError(f"completions[{i}] must be a string or a list of token ids")
            if not c_ids:
                raise ValueError(f"completions[{i}] is empty")
            items.append(self._prepare(prompt_ids + c_ids, None))
        start = len(prompt_ids)
        tasks = self._run_prefill(
            [(text, ids, _PREFILL_PARAMS) for text, ids, _ in items], lambda: PrefillTask("score", score_start=start)
        )
        return [list(task.scores) for task in tasks]

    def _prepare_many(self, prompts: Any, params: Any) -> list[tuple[str | None, list[int], SamplingParams]]:
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty str, list of str, or list of token-id lists")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"params has {len(params_list)} entries for {len(prompts)} prompts")
        return [self._prepare(p, sp) for p, sp in zip(prompts, params_list)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Generator[StreamDelta, None, None]:
        """Yield deltas as they are generated. Closing the iterator early aborts the request."""
        item = self._prepare(prompt, params)
        q: queue.SimpleQueue = queue.SimpleQueue()
        (tracker,) = self._submit([item], lambda rid: q.put)
        finished = False
        try:
            while (delta := next_delta(q.get())) is not None:
                yield delta
            finished = True
        finally:
            if not finished:
                self.abort(tracker.rid)

    async def generate_async(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> AsyncGenerator[StreamDelta, None]:
        """`async for delta in engine.generate_async(...)`; leaving the loop early aborts the request.

        Validation happens before anything is enqueued: a bad prompt or
        parameter raises ValueError from the first iteration.
        """
        item = self._prepare(prompt, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        (tracker,) = self._submit([item], lambda rid: lambda x: loop.call_soon_threadsafe(q.put_nowait, x))
        finished = False
        try:
            while (delta := next_delta(await q.get())) is not None:
                yield delta
            finished = True
        finally:
            if not finished:
                self.abort(tracker.rid)

    # -- chat ------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of `messages` through the tokenizer's chat template, ready for a reply (or,
        without `add_generation_prompt`, ending with the last message; with
        `continue_final_message`, open at the end of the last (assistant) message, to be
        continued). `chat_template_kwargs` reach the template as variables (e.g. Qwen3's
        `enable_thinking`). A message may carry a `name` beside its role and content; an
        assistant message `tool_calls` (`[{"id", "type": "function", "function": {"name",
        "arguments": dict}}]`) and `reasoning_content`, a tool message `tool_call_id`. `tools`
        (OpenAI function tools) reach the template as transformers' `tools=`."""
        tok = self._require_tokenizer("chat")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
            extra_keys = set(m) - _MESSAGE_KEYS
            if extra_keys or not all(isinstance(m.get(k, ""), str) for k in _MESSAGE_KEYS - {"tool_calls"}):
                raise ValueError(f"messages[{i}] may hold only string {sorted(_MESSAGE_KEYS - {'tool_calls'})} "
                                 "and a list 'tool_calls'")
            if not isinstance(m.get("tool_calls", []), list):
                raise ValueError(f"messages[{i}].tool_calls must be a list")
            check_text(f"messages[{i}].content", m["content"])
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of tool dicts")
        extra = dict(chat_template_kwargs or {})
        taken = sorted(set(extra) & _CHAT_TEMPLATE_ARGS)
        if taken or not all(isinstance(k, str) for k in extra):
            raise ValueError(f"chat_template_kwargs must map variable names to values, not set {taken}")
        if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
            raise ValueError("continue_final_message needs add_generation_prompt false and an assistant message last")
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template")
        from jinja2 import TemplateError  # transformers' template engine

        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          continue_final_message=continue_final_message, tools=tools or None, **extra)
        except TemplateError as exc:  # the template's own raise_exception(), e.g. a role order it refuses
            raise ValueError(f"the chat template refused the messages: {exc}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], params, progress=False)[0]

    def chat_stream(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None
    ) -> Generator[StreamDelta, None, None]:
        return self.stream(self.apply_chat_template(messages), params)

    # -- cache and stats -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and gauges. While a step runs, the snapshot taken after the last one
        (so a metrics scrape never waits for the GPU)."""
        if self._lock.acquire(blocking=False):
            try:
                self._stats = self.core.stats()
            finally:
                self._lock.release()
        return dict(self._stats)

    def is_alive(self) -> bool:
        """The loop thread runs and has met no fatal error (what a health check asks). A step
        that fails ends only the requests that caused it; the engine serves on."""
        return self._error is None and self._thread.is_alive()

    @property
    def fatal_error(self) -> BaseException | None:
        """Why the loop stopped serving (EngineFatalError or a bug), or None while it serves."""
        return self._error

    def flush_cache(self) -> bool:
        """Drop every cached prefix. Refused (False) while requests are running."""
        with self._lock:
            if self.core.has_work():
                return False
            return self.core.flush_cache()

    def check_invariants(self) -> None:
        with self._lock:
            self.core.check_invariants()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is queued or running (tests, graceful drains); False at the
        timeout, or at once when the loop has stopped (nothing would ever finish)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._cv:
                pending = bool(self._inbox or self._aborts)
            with self._lock:
                busy = self.core.has_work()
            if not pending and not busy:
                return True
            time.sleep(0.005)
        return False

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer; the model at {self.model_path} has none")
        return self.tokenizer
