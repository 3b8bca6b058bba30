"""OpenAI's Responses API, the text subset vLLM serves: POST /v1/responses, GET /v1/responses/{id}.

    {"model", "input": str | [{"role", "content": str | [{"type": "input_text", "text"}]}],
     "instructions", "max_output_tokens", "temperature", "top_p", "stream", "metadata", "user",
     "store", "previous_response_id"}

The input goes through the chat template (instructions first, as a system message) and the
reply is one assistant message with one `output_text` part. Streamed, the events are
response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta (one per engine step with text),
response.output_text.done, response.content_part.done, response.output_item.done and
response.completed, each numbered by `sequence_number`. Stored responses (`store`, true by
default as in OpenAI's API) can be continued with `previous_response_id` and read back.
Tools, background mode and structured `text` formats are refused with a 400 naming them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from radixserve.engine.outputs import StreamDelta
from radixserve.server.openai_api import (
    ApiError,
    GenerateRequest,
    bad_request,
    build_sampling_params,
    check_known,
    check_model,
    check_object,
    get_bool,
    get_int,
    refuse_unless,
    sampling_error,
)
from radixserve.server.responses import ResponseBuilder
from radixserve.server.routes import Generation, count_usage, json_response, read_json, tokenize_request
from radixserve.server.state import ServerState, state_of

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_NEUTRAL = {  # accepted only with the value that asks for nothing this server lacks
    "tools": (lambda v: v == [], "tools are not implemented on /v1/responses"),
    "tool_choice": (lambda v: v in ("auto", "none"), "tools are not implemented on /v1/responses"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "it must be a boolean"),
    "background": (lambda v: v is False, "background responses are not implemented"),
    "text": (lambda v: v == {"format": {"type": "text"}}, "only {'format': {'type': 'text'}} is implemented"),
    "truncation": (lambda v: v == "disabled", "only 'disabled' is implemented"),
    "include": (lambda v: v == [], "no extra output (include) is implemented"),
    "reasoning": (lambda v: False, "reasoning options are not implemented"),
    "top_logprobs": (lambda v: v == 0 and not isinstance(v, bool), "logprobs are not implemented on /v1/responses"),
    "service_tier": (lambda v: v in ("auto", "default"), "there is one service tier"),
}
RESPONSES_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "metadata", "user",
    "store", "previous_response_id", *_NEUTRAL,
}


@dataclass
class ResponsesRequest:
    messages: list[dict[str, str]]  # this request's input, without the instructions
    instructions: str | None
    sampling: dict[str, Any]
    max_output_tokens: int | None
    stream: bool
    store: bool | None  # None: not given (stored when the server keeps responses)
    previous_response_id: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    user: str | None = None


def parse_responses(body: Any, served: str) -> ResponsesRequest:
    """POST /v1/responses: everything checked, each bad field a 400 naming it."""
    body = check_object(body)
    check_known(body, RESPONSES_FIELDS)
    check_model(body, served)
    for name, (ok, why) in _NEUTRAL.items():
        refuse_unless(body, name, ok, why)
    sampling: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad_request(f"{name} must be a number, got {value!r}", param=name)
            sampling[name] = value
    if not 0 <= sampling.get("temperature", 0) <= 2:
        raise bad_request(f"temperature must be in [0, 2], got {sampling['temperature']!r}", param="temperature")
    instructions = _optional_str(body, "instructions")
    previous = _optional_str(body, "previous_response_id")
    return ResponsesRequest(
        messages=parse_input(body.get("input")),
        instructions=instructions,
        sampling=sampling,
        max_output_tokens=get_int(body, "max_output_tokens", 1),
        stream=get_bool(body, "stream"),
        store=None if body.get("store") is None else get_bool(body, "store"),
        previous_response_id=previous,
        metadata=_metadata(body.get("metadata")),
        user=_optional_str(body, "user"),
    )


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {type(value).__name__}", param=name)
    return value


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise bad_request("metadata must be an object of at most 16 string pairs", param="metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise bad_request(f"metadata.{key} must be a string of at most 512 characters under a key of at most "
                              "64", param=f"metadata.{key}")
    return dict(value)


def parse_input(value: Any) -> list[dict[str, str]]:
    """`input`: a string (one user message) or message items with text content."""
    if isinstance(value, str):
        if not value:
            raise bad_request("input must not be empty", param="input")
        return [{"role": "user", "content": value}]
    if value is None:
        raise bad_request("you must provide input", param="input", code="missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a string or a non-empty array of message items", param="input")
    if len(value) > 4096:
        raise bad_request("too many input items (the limit is 4096)", param="input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param=where)
        if item.get("type", "message") != "message":
            raise bad_request(f"{where}.type {item.get('type')!r} is not supported: only message items",
                              param=f"{where}.type")
        check_known({f"{where}.{k}": v for k, v in item.items()},
                    {f"{where}.{k}" for k in ("type", "role", "content", "id", "status")})
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role")
        out.append({"role": _ROLES[role], "content": _content(item.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} must be a string or a non-empty array of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if (not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text")
                or not isinstance(part.get("text"), str)):
            raise bad_request(f"{at} must be a text part {{'type': 'input_text', 'text': ...}}; other content "
                              "types are not supported", param=at)
        extra = set(part) - {"type", "text", "annotations", "logprobs"}
        if extra:
            raise bad_request(f"{at} has unsupported keys {sorted(extra)}", param=at)
        texts.append(part["text"])
    return "\n".join(texts)


# -- the response object -------------------------------------------------------------------


class ResponseRender:
    """The response object of one request, as it grows; `event()` numbers stream events."""

    def __init__(self, rreq: ResponsesRequest, model: str, builder: ResponseBuilder) -> None:
        self.rreq = rreq
        self.model = model
        self.builder = builder
        self.id = "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self._seq: Iterator[int] = itertools.count()

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(self._seq), **fields}

    @property
    def text(self) -> str:
        return self.builder.choices[0].text

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def item(self, status: str) -> dict[str, Any]:
        content = [self.part()] if status != "in_progress" else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def body(self, status: str) -> dict[str, Any]:
        """`status`: in_progress (no output yet), completed, or incomplete (max_output_tokens reached)."""
        r, usage = self.rreq, self.builder.usage
        done = status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": self.model,
            "output": [self.item(status)] if done else [], "parallel_tool_calls": True,
            "previous_response_id": r.previous_response_id, "reasoning": None, "store": r.store,
            "temperature": r.sampling.get("temperature", 1.0), "top_p": r.sampling.get("top_p", 1.0),
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            } if done else None,
            "user": r.user, "metadata": r.metadata,
        }

    def final_status(self) -> str:
        return "incomplete" if self.builder.choices[0].finish_reason == "length" else "completed"


# -- handlers --------------------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    rreq = parse_responses(await read_json(request), state.model_name)
    if rreq.store is None:
        rreq.store = state.responses.max_items > 0
    elif rreq.store and state.responses.max_items == 0:
        raise bad_request("this server stores no responses (--responses-store-size 0)", param="store")
    history: list[dict[str, str]] = []
    if rreq.previous_response_id is not None:
        found = state.responses.conversation(rreq.previous_response_id)
        if found is None:
            raise bad_request(f"Previous response with id '{rreq.previous_response_id}' not found (responses are "
                              "kept in memory, the least recently used dropped first)",
                              param="previous_response_id", code="previous_response_not_found")
        history = found
    messages = history + rreq.messages
    if rreq.instructions:
        messages = [{"role": "system", "content": rreq.instructions}, *messages]
    req = GenerateRequest(route="responses", prompts=[], messages=messages, sampling=rreq.sampling,
                          max_tokens=rreq.max_output_tokens, max_tokens_param="max_output_tokens",
                          stream=rreq.stream, user=rreq.user)
    try:
        prompts, _ = await tokenize_request(state, req)
    except ApiError as exc:
        if exc.param == "messages":
            exc.param = "input"
        raise
    params = build_sampling_params(req, [len(prompts[0])], state.context_limit, None)
    try:
        state.engine.check_params(params)
    except ValueError as exc:
        raise sampling_error(req, exc) from None
    builder = ResponseBuilder("chat", state.model_name, 1, [len(prompts[0])], state.token_text)
    render = ResponseRender(rreq, state.model_name, builder)
    async with (
        Generation(state, prompts, params, "input") as gen,
        contextlib.aclosing(gen.events()) as events,
    ):
        first = await anext(events, None)  # validation errors surface here, before any header is sent
        if rreq.stream:
            return await _stream(request, state, render, gen, first, events)
        item = first
        while item is not None:
            builder.add(*item)
            item = await anext(events, None)
    count_usage(state, builder)
    body = render.body(render.final_status())
    _store(state, render, body)
    return json_response(body)


def _store(state: ServerState, render: ResponseRender, body: dict[str, Any]) -> None:
    if render.rreq.store:
        turn = [*render.rreq.messages, {"role": "assistant", "content": render.text}]
        state.responses.put(body, turn, render.rreq.previous_response_id)


async def _stream(
    request: web.Request,
    state: ServerState,
    render: ResponseRender,
    gen: Generation,
    first: tuple[int, StreamDelta] | None,
    events: AsyncIterator[tuple[int, StreamDelta]],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(event: dict[str, Any]) -> None:
        await resp.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())

    where = {"item_id": render.item_id, "output_index": 0, "content_index": 0}
    try:
        await send(render.event("response.created", response=render.body("in_progress")))
        await send(render.event("response.in_progress", response=render.body("in_progress")))
        await send(render.event("response.output_item.added", output_index=0, item=render.item("in_progress")))
        await send(render.event("response.content_part.added", part=render.part(), **where))
        item = first
        while item is not None:
            render.builder.add(*item)
            if item[1].text:
                await send(render.event("response.output_text.delta", delta=item[1].text, logprobs=[], **where))
            item = await anext(events, None)
        status = render.final_status()
        await send(render.event("response.output_text.done", text=render.text, logprobs=[], **where))
        await send(render.event("response.content_part.done", part=render.part(), **where))
        await send(render.event("response.output_item.done", output_index=0, item=render.item(status)))
        count_usage(state, render.builder)
        body = render.body(status)
        _store(state, render, body)
        await send(render.event("response.completed", response=body))
    except ApiError as exc:  # headers are out: an error event (the openai client raises it)
        error = exc.body()["error"]
        with contextlib.suppress(ConnectionResetError):
            await send(render.event("error", code=error["code"], message=error["message"], param=error["param"],
                                    error=error))
    except ConnectionResetError:  # the client went away; leaving Generation aborts the request
        gen.client_gone = True
        return resp
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def get_response(request: web.Request) -> web.Response:
    state = state_of(request)
    response_id = request.match_info["response_id"]
    entry = state.responses.get(response_id)
    if entry is None:
        raise ApiError(404, f"Response with id '{response_id}' not found", param="response_id", code="not_found")
    return json_response(entry.body)


ROUTES = (
    ("POST", "/v1/responses", create_response),
    ("GET", "/v1/responses/{response_id}", get_response),
)
