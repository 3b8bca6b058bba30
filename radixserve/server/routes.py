"""The HTTP routes: OpenAI completions/chat/embeddings/models, native /generate, health, metrics, flush.

Generation requests go through `Generation`, which runs a request's prompts in
the engine (its own loop thread), merges their deltas on the event loop and
aborts whatever is unfinished when the handler leaves, normally or not: a
client that disconnects cancels the handler (aiohttp `handler_cancellation`)
or fails a write, and either way its sequences are aborted and their KV slots
freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
from aiohttp import web

from radixserve.engine.engine import ContextLengthError
from radixserve.engine.outputs import StreamDelta
from radixserve.sampling_params import SamplingParams
from radixserve.server.chat_output import OutputFormat
from radixserve.server.native_api import native_delta, native_response, parse_generate
from radixserve.server.openai_api import (
    ApiError,
    GenerateRequest,
    bad_request,
    build_sampling_params,
    chat_template_error,
    check_unicode,
    parse_chat,
    parse_completion,
    parse_embedding,
    sampling_error,
)
from radixserve.server.responses import ResponseBuilder
from radixserve.server.state import ServerState, state_of
from radixserve.server.tools import template_text, tool_output
from radixserve.server.transport import json_response

logger = logging.getLogger(__name__)

_END = object()  # a prompt's stream ended
_CUT = object()  # the server cut the request at its drain timeout
_DEFAULT_MAX_TOKENS = {"completions": 16, "chat": None, "responses": None, "generate": SamplingParams().max_tokens}


async def read_json(request: web.Request) -> Any:
    """The body of a JSON route: `application/json` (else 415), UTF-8 text (else 400), JSON whose
    strings are all valid Unicode (else 400 naming the field); a late body is the middleware's 408."""
    # Only JSON: a web page can make a browser post text/plain, form data or an untyped body to any
    # address without asking it first (a CORS "simple request"); application/json it cannot.
    if request.content_type != "application/json" or (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        sent = request.headers.get("Content-Type")
        raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{'no Content-Type' if sent is None else repr(sent)}", code="unsupported_media_type")
    limit = state_of(request).config.max_body_bytes  # aiohttp enforces it while reading; checked early here
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the request body is {request.content_length} bytes; the limit is {limit}",
                       code="request_too_large")
    raw = await request.read()
    if not raw:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})",
                          code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    check_unicode(body, text)
    return body


# -- generation ------------------------------------------------------------------------------


class Generation:
    """A request's prompts running in the engine; `async with` it, then iterate `events()`.

    Leaving the block aborts every prompt not finished yet (cancelling a pump
    task closes its `generate_async` generator, which calls `Engine.abort`).
    """

    def __init__(
        self, state: ServerState, prompts: list[list[int]], params: SamplingParams, prompt_param: str
    ) -> None:
        self.state = state
        self.prompts = prompts
        self.params = params
        self.prompt_param = prompt_param  # named by a 400 when the engine refuses a prompt
        self.n_seqs = params.n * len(prompts)
        self.arrival = time.monotonic()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first_token: list[bool] = [False] * len(prompts)
        self._last_time: dict[tuple[int, int], float] = {}
        self.client_gone = False  # set when a write finds the connection closed

    async def __aenter__(self) -> Generation:
        admit(self.state, self.n_seqs, "n")
        self.state.generations.add(self)
        self._tasks = [asyncio.create_task(self._pump(i, ids)) for i, ids in enumerate(self.prompts)]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.state.pending -= self.n_seqs
        self.state.generations.discard(self)
        unfinished = [t for t in self._tasks if not t.done()]
        for t in unfinished:
            t.cancel()
        if unfinished:
            # Cancelled handler: aiohttp saw the connection close (handler_cancellation).
            if self.client_gone or exc_type is asyncio.CancelledError:
                self.state.metrics.aborted.inc()
            await asyncio.gather(*unfinished, return_exceptions=True)

    async def _pump(self, i: int, ids: list[int]) -> None:
        agen = self.state.engine.generate_async(ids, self.params)
        try:
            async for delta in agen:
                self._queue.put_nowait((i, delta))
            self._queue.put_nowait((i, _END))
        except Exception as exc:  # handed to the consumer, which answers the client
            self._queue.put_nowait((i, exc))
        finally:
            await agen.aclose()  # a no-op after a normal end; aborts the request otherwise

    def cut(self, drain_timeout: float) -> None:
        """End `events()` with a 503 `ApiError` (the server is shutting down and waited `drain_timeout` s)."""
        self._queue.put_nowait((-1, (_CUT, drain_timeout)))

    async def events(self) -> AsyncGenerator[tuple[int, StreamDelta], None]:
        """(prompt index, delta) in arrival order until every prompt has finished (or `cut`)."""
        open_prompts = len(self.prompts)
        while open_prompts:
            i, item = await self._queue.get()
            if isinstance(item, tuple) and item[0] is _CUT:
                raise ApiError(503, f"the server is shutting down and cut this request after waiting "
                                    f"{item[1]:g} s for it (drain timeout)", code="shutting_down")
            if item is _END:
                open_prompts -= 1
                self.state.metrics.e2e.observe(time.monotonic() - self.arrival)
                continue
            if isinstance(item, BaseException):
                raise _engine_error(item, self.prompt_param, i)
            if item.finish_reason is not None:
                self.state.metrics.finished(item.finish_reason, item.prompt_tokens, item.completion_tokens)
            if item.finish_reason == "error":  # a step failed and this request caused it
                raise ApiError(500, f"the request failed inside the engine: {item.error}", code="engine_error")
            self._observe(i, item)
            yield i, item

    def _observe(self, i: int, delta: StreamDelta) -> None:
        if not delta.token_ids:
            return
        now = time.monotonic()
        metrics = self.state.metrics
        if not self._first_token[i]:
            self._first_token[i] = True
            metrics.ttft.observe(now - self.arrival)
        last = self._last_time.get((i, delta.index))
        if last is not None:
            gap = (now - last) / len(delta.token_ids)  # one step may bring several tokens
            for _ in delta.token_ids:
                metrics.itl.observe(gap)
        self._last_time[(i, delta.index)] = now


def admit(state: ServerState, n_seqs: int, param: str) -> None:
    """Count `n_seqs` more sequences as pending, or refuse: 400 if they can never fit, else 503 while full.

    The caller gives them back (`state.pending -= n_seqs`) when they finish.
    """
    if n_seqs > state.max_pending:
        raise bad_request(f"this request asks for {n_seqs} sequences; the server admits at most "
                          f"{state.max_pending} at once", param=param)
    if state.pending + n_seqs > state.max_pending:
        state.metrics.rejected.inc()
        raise ApiError(503, f"the server is at capacity ({state.pending} sequences pending); retry later",
                       code="server_overloaded", headers={"Retry-After": str(state.config.retry_after_s)})
    state.pending += n_seqs


def _engine_error(exc: BaseException, prompt_param: str, prompt_index: int) -> ApiError:
    if isinstance(exc, ValueError):  # the engine's validation: the client's mistake
        return bad_request(str(exc), param=prompt_param if "prompt" in str(exc) else None)
    if isinstance(exc, RuntimeError) and "shut down" in str(exc):
        return ApiError(503, "the server is shutting down", code="shutting_down")
    logger.error("generation failed for prompt %d", prompt_index, exc_info=exc)
    return ApiError(500, f"the engine failed: {exc}", code="engine_error")


async def tokenize_request(state: ServerState, req: GenerateRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt (truncated as the request asks), checked against the context, and
    the texts to echo: each prompt's (completions; decoded when truncated) or chat's last message."""
    keep = _keep_last(state, req)
    if req.messages is not None:
        try:
            ids = await asyncio.to_thread(functools.partial(
                state.engine.apply_chat_template, req.messages, tools=req.tools.tools or None, **req.chat_options))
        except ValueError as exc:
            raise chat_template_error(exc) from None
        ids = ids[-keep:] if keep is not None else ids
        check_prompts(state, [ids], "messages")
        last = req.messages[-1]
        return [ids], [last["content"] if req.echo and last["role"] == _chat_role(req) else ""]
    param = _prompt_param(req)
    full = await encode_prompts(state, req.prompts, param, check=False)
    prompts = [ids[-keep:] for ids in full] if keep is not None else full
    check_prompts(state, prompts, param)
    tok = state.engine.tokenizer
    if not req.echo:
        return prompts, []
    if tok is None:
        raise bad_request("echo needs a tokenizer to show token-id prompts as text", param="echo")
    return prompts, [p if isinstance(p, str) and len(ids) == len(f) else tok.decode(ids)
                     for p, ids, f in zip(req.prompts, prompts, full)]


def _keep_last(state: ServerState, req: GenerateRequest) -> int | None:
    """How many prompt tokens truncate_prompt_tokens keeps (-1: all the context leaves beside max_tokens)."""
    if req.truncate_prompt_tokens is None or req.truncate_prompt_tokens > 0:
        return req.truncate_prompt_tokens
    room = state.context_limit - (req.max_tokens or _DEFAULT_MAX_TOKENS[req.route] or 1)
    if room < 1:
        raise bad_request(f"truncate_prompt_tokens=-1 leaves no room for a prompt beside {req.max_tokens_param}="
                          f"{req.max_tokens} (context {state.context_limit} tokens)", param=req.max_tokens_param)
    return room


def _chat_role(req: GenerateRequest) -> str:
    """The reply's role, as vLLM gives it: the assistant's after a generation prompt, else the last message's."""
    if req.messages is None or req.chat_options.get("add_generation_prompt", True):
        return "assistant"
    return req.messages[-1]["role"]


def _prompt_param(req: GenerateRequest) -> str:
    if req.route == "generate":
        return "text" if isinstance(req.prompts[0], str) else "input_ids"
    return "messages" if req.route == "chat" else "prompt"


async def encode_prompts(
    state: ServerState, prompts: list[str | list[int]], param: str, *, check: bool = True
) -> list[list[int]]:
    """Token ids of text prompts (in a worker thread: long prompts take a while), checked unless `check` is false."""
    tok = state.engine.tokenizer
    if tok is None and any(isinstance(p, str) for p in prompts):
        raise bad_request("this model has no tokenizer: send token ids", param=param)
    ids = await asyncio.to_thread(
        lambda: [tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in prompts])
    if check:
        check_prompts(state, ids, param)
    return ids


def check_prompts(state: ServerState, prompts: list[list[int]], param: str) -> None:
    """Engine.check_prompt_ids for each prompt, its refusal as a 400 (OpenAI's wording for length)."""
    for ids in prompts:
        try:
            state.engine.check_prompt_ids(ids)
        except ContextLengthError as exc:
            raise bad_request(
                f"This model's maximum context length is {exc.limit} tokens, and the prompt has {exc.length}; "
                "it must leave room for at least one output token.", param=param, code="context_length_exceeded",
            ) from None
        except ValueError as exc:
            raise bad_request(str(exc), param=param) from None


def _chat_output(state: ServerState, req: GenerateRequest) -> tuple[OutputFormat | None, dict[str, Any]]:
    """How chat replies are read (tool calls, reasoning; None: as plain text), and the sampling
    fields that force tool calls."""
    if req.route != "chat":
        return None, {}
    fmt, max_calls, extra = tool_output(req.tools, state.config.tool_call_parser,
                                        template_text(state.engine.tokenizer))
    # A forced reply is JSON from its first token (its schema leaves no room for thinking).
    reasoning = None if req.tools.forced else state.config.reasoning_parser
    if fmt is None and reasoning is None:
        return None, extra
    return OutputFormat(tools=fmt, max_calls=max_calls, reasoning=reasoning), extra


async def _generate(request: web.Request, req: GenerateRequest) -> web.StreamResponse:
    state = state_of(request)
    output, extra = _chat_output(state, req)
    prompts, texts = await tokenize_request(state, req)
    if output is not None and output.reasoning is not None:  # does the prompt open a think block?
        output = dataclasses.replace(output, prompt_tail=state.engine.tokenizer.decode(prompts[0][-8:]))
    params = build_sampling_params(req, [len(p) for p in prompts], state.context_limit,
                                   _DEFAULT_MAX_TOKENS[req.route], extra)
    try:
        # What only the model can tell (token ids past its vocabulary, a grammar that does not compile:
        # compiling takes a while, so in a worker thread).
        await asyncio.to_thread(state.engine.check_params, params)
    except ValueError as exc:
        raise sampling_error(req, exc) from None
    if req.sglang is not None and req.sglang.start >= len(prompts[0]):
        raise bad_request(f"logprob_start_len must be below the prompt's length ({len(prompts[0])} tokens), got "
                          f"{req.sglang.start}", param="logprob_start_len")
    builder = ResponseBuilder(
        "chat" if req.route == "chat" else "completions", state.model_name, params.n, [len(p) for p in prompts],
        state.token_text, echo_texts=texts if req.echo else None, include_usage=req.include_usage,
        logprobs=params.logprobs is not None, chat_role=_chat_role(req), prompt_ids=prompts,
        return_token_ids=req.return_token_ids, continuous_usage=req.continuous_usage,
        tokens_as_ids=req.tokens_as_ids, request_id=req.request_id,
        echo_logprobs=req.logprobs if req.echo else None, prompt_logprobs=req.prompt_logprobs, output=output,
    )
    if req.user:
        logger.debug("request %s for user %r", builder.id, req.user)
    async with (
        Generation(state, prompts, params, _prompt_param(req)) as gen,
        contextlib.aclosing(gen.events()) as events,
    ):
        first = await anext(events, None)  # validation errors surface here, before any header is sent
        if req.stream:
            return await _stream(request, req, gen, builder, first, events)
        request_id = first[1].request_id if first is not None else ""
        if first is not None:
            builder.add(*first)
            async for i, delta in events:
                builder.add(i, delta)
    count_usage(state, builder)
    if req.route == "generate":
        return json_response(native_response(builder, request_id, req.sglang))
    return json_response(builder.response())


async def _stream(
    request: web.Request,
    req: GenerateRequest,
    gen: Generation,
    builder: ResponseBuilder,
    first: tuple[int, StreamDelta] | None,
    events: AsyncIterator[tuple[int, StreamDelta]],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await _write_events(request, resp, req, builder, first, events)
    except ApiError as exc:  # headers are out: the error travels as an event (the openai client raises it)
        with contextlib.suppress(ConnectionResetError):
            await _sse(resp, exc.body())
            await resp.write(b"data: [DONE]\n\n")  # the stream ends as a stream, not as a cut body
    except ConnectionResetError:  # the client went away mid-stream; leaving Generation aborts the rest
        logger.debug("client disconnected from %s", builder.id)
        gen.client_gone = True
        return resp
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _write_events(
    request: web.Request,
    resp: web.StreamResponse,
    req: GenerateRequest,
    builder: ResponseBuilder,
    first: tuple[int, StreamDelta] | None,
    events: AsyncIterator[tuple[int, StreamDelta]],
) -> None:
    """The event stream: opening chunks, one chunk per delta, usage if asked, [DONE]."""
    native = req.route == "generate"
    if not native:
        for chunk in builder.opening_chunks():
            await _sse(resp, chunk)
    item = first
    while item is not None:
        if native:
            builder.add(*item)
            await _sse(resp, native_delta(item[1], req.sglang, builder))
        else:
            for body in builder.delta_chunks(*item):
                await _sse(resp, body)
        item = await anext(events, None)
    if builder.include_usage:
        await _sse(resp, builder.usage_chunk())
    count_usage(state_of(request), builder)
    await resp.write(b"data: [DONE]\n\n")


async def _sse(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")


def count_usage(state: ServerState, builder: ResponseBuilder) -> None:
    usage = builder.usage
    state.metrics.count_usage(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)


# -- handlers --------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await read_json(request), state_of(request).model_name))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat(await read_json(request), state_of(request).model_name))


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_generate(await read_json(request)))


async def embeddings(request: web.Request) -> web.Response:
    state = state_of(request)
    embed = state.engine.embed
    req = parse_embedding(await read_json(request), state.model_name)
    prompts = await encode_prompts(state, req.inputs, "input")
    admit(state, len(prompts), "input")
    try:  # Engine.embed blocks until done (and cannot be aborted): a worker thread waits for it
        vectors = await asyncio.to_thread(embed, prompts, **req.options)
    except ValueError as exc:
        raise bad_request(str(exc), param="input") from None
    finally:
        state.pending -= len(prompts)
    data = []
    for i, vec in enumerate(vectors):
        values = [float(v) for v in vec]
        emb: Any = values
        if req.encoding_format == "base64":
            emb = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(len(p) for p in prompts)
    return json_response({"object": "list", "data": data, "model": state.model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "radixserve",
            "root": str(state.engine.model_path), "parent": None, "max_model_len": state.context_limit}


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(state_of(request))]})


async def get_model(request: web.Request) -> web.Response:
    state = state_of(request)
    name = request.match_info["model"]
    if name != state.model_name:
        raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
    return json_response(_model_card(state))


async def health(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.draining:
        return json_response({"status": "draining"}, status=503)
    if not state.engine_alive():
        error = state.engine.fatal_error
        return json_response({"status": "engine failed", "error": None if error is None else repr(error)}, status=503)
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    # Engine.stats takes the engine's step lock: off the event loop.
    body, content_type = await asyncio.to_thread(state.metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def flush_cache(request: web.Request) -> web.Response:
    state = state_of(request)
    if not await asyncio.to_thread(state.engine.flush_cache):
        raise ApiError(409, "requests are running; the cache can only be flushed when the engine is idle",
                       code="engine_busy")
    return json_response({"flushed": True})


ROUTES = (
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/embeddings", embeddings),
    ("POST", "/generate", generate),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model}", get_model),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("POST", "/flush_cache", flush_cache),
)
