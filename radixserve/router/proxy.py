"""Forwarding a client's request to a replica, and its answer back, streams event by event.

A request goes to the replica the policy picks among the healthy ones. It is sent
again to another replica (at most `max_attempts` in all) when nothing of it has
reached the client yet and the replica could not answer: the connection failed or
broke before the whole answer arrived (the replica then leaves the rotation), or
it answered 502, 503 or 504 (overloaded, draining, engine failed: its health is
checked at once). Other statuses, 4xx and 500 included, are the answer.

A stream (`text/event-stream`) is passed on event by event as the replica sends
it; once its first event has reached the client it cannot move. If the replica's
stream breaks or ends before its last event (`data: [DONE]`, or a /v1/responses
stream's final named event), the client gets an error event (code
`replica_failed`) of the stream's kind, as a server's own mid-stream failure ends.

A request naming a stored /v1/responses result (`previous_response_id`, GET
/v1/responses/{id}) goes to the replica that stored it, while healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from radixserve.router.keys import answer_text, answered_key, request_key
from radixserve.router.policy import PromptKey, RouteChoice
from radixserve.router.replicas import Replica
from radixserve.router.state import RouterState, router_of
from radixserve.server.openai_api import ApiError

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Radixserve-Replica"  # on every forwarded answer: the replica that gave it
_RETRY_STATUSES = (502, 503, 504)
_REQUEST_HEADERS = ("Content-Type", "Authorization", "Accept", "User-Agent")
_RESPONSE_HEADERS = ("Content-Type", "Cache-Control", "Retry-After", "WWW-Authenticate", "Allow")
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
_JSON_IN_THREAD = 1 << 18  # bodies larger than this are parsed in a worker thread


class _Failed(NamedTuple):
    reason: str  # "connection" or "status"
    answer: web.Response | None  # the replica's own error answer, returned when no retry is left


def _event_data(event: bytes) -> Any:
    """The JSON of an event's `data:` line (None for [DONE], none, or not JSON)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            try:
                return json.loads(line[6:])
            except (ValueError, RecursionError):
                return None
    return None


def _event_name(event: bytes) -> bytes:
    return event[7:].split(b"\n", 1)[0].strip() if event.startswith(b"event: ") else b""


# How a complete stream ends: OpenAI's chat and completions streams and /generate with data: [DONE];
# a /v1/responses stream with its last named event.
_LAST_EVENTS = (b"response.completed", b"response.failed", b"response.incomplete", b"error")


def _is_last(event: bytes) -> bool:
    return event == b"data: [DONE]" or _event_name(event) in _LAST_EVENTS


class _Answer:
    """What the router learns from an answer as it passes: the text of choice 0 (once complete, the
    policy records prompt + answer at the replica that gave it: keys.answered_key), and the id of a
    /v1/responses result (stored at that replica: later requests naming it go there)."""

    def __init__(self, route: str | None, body: Any, key: PromptKey | None, active: bool) -> None:
        self.route = route or ""
        self.body = body
        self.active = active and key is not None and self.route in ("chat", "completions")
        self.parts: list[str] = []
        self.response_id: str | None = None

    def add_body(self, payload: bytes) -> None:
        if self.active or self.route == "responses":
            with contextlib.suppress(ValueError, RecursionError):
                self._add(json.loads(payload), stream=False)

    def add_event(self, event: bytes) -> None:
        if self.active or (self.route == "responses" and self.response_id is None):
            self._add(_event_data(event), stream=True)

    def _add(self, data: Any, stream: bool) -> None:
        if self.route == "responses":
            response = data.get("response", data) if isinstance(data, dict) else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.response_id = response["id"]
        else:
            self.parts.append(answer_text(self.route, data, stream) or "")

    def record(self, state: RouterState, replica: Replica) -> None:
        if self.response_id is not None:
            state.response_owners.add(self.response_id, replica.url)
        if self.active:
            key = answered_key(self.route, self.body, "".join(self.parts))
            if key is not None:
                state.policy.record(replica.url, key)


async def _parse(route: str | None, body: bytes) -> tuple[Any, PromptKey | None]:
    """The JSON body and its prompt key; (None, None) for a body the router cannot read (the replica
    answers it)."""
    if route is None or not body:
        return None, None

    def parse() -> tuple[Any, PromptKey | None]:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return None, None
        return parsed, request_key(route, parsed)

    return await asyncio.to_thread(parse) if len(body) > _JSON_IN_THREAD else parse()


async def forward(request: web.Request, route: str | None) -> web.StreamResponse:
    """Send `request` to a replica chosen by the policy (by the prompt of a `route` body)."""
    state = router_of(request)
    body = await request.read()  # a late body: the middleware's 408
    parsed, key = await _parse(route, body)
    tried: set[str] = set()
    failed: _Failed | None = None
    label = route or request.path
    owner = _owner(request, route, parsed, state)
    for attempt in range(state.config.max_attempts):
        loads = {r.url: r.inflight for r in state.replicas.healthy() if r.url not in tried}
        if not loads:
            break
        if failed is not None:
            state.metrics.retries.labels(failed.reason).inc()
        if owner in loads:  # the replica that stored the response this request names
            choice = RouteChoice(owner, "response_owner", 0, 0)
        else:
            choice = state.policy.choose(key, loads)
        state.metrics.decisions.labels(state.policy.name, choice.reason).inc()
        if attempt == 0 and choice.key_len:
            state.metrics.match_ratio.observe(choice.matched / choice.key_len)
            state.metrics.match_length.observe(choice.matched)
        replica = state.replicas.replicas[choice.replica]  # one of `loads`: nothing ran since they were read
        tried.add(replica.url)
        answer = _Answer(route, parsed, key, state.policy.name == "cache_aware")
        outcome = await _send(request, state, replica, body, label, answer)
        if not isinstance(outcome, _Failed):
            return outcome
        failed = outcome
    if failed is not None and failed.answer is not None:
        return failed.answer
    healthy = len(state.replicas.healthy())
    raise ApiError(503, f"no replica could take the request ({healthy} of {len(state.replicas)} healthy, "
                        f"{len(tried)} tried)", code="no_healthy_replica", headers={"Retry-After": "1"})


def _owner(request: web.Request, route: str | None, parsed: Any, state: RouterState) -> str | None:
    """The replica holding the stored response a /v1/responses request names, if the router saw it."""
    if route == "response_get":
        return state.response_owners.get(request.match_info.get("response_id"))
    if route == "responses" and isinstance(parsed, dict):
        return state.response_owners.get(parsed.get("previous_response_id"))
    return None


def _request_headers(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in _REQUEST_HEADERS if h in request.headers}


def _response_headers(upstream: aiohttp.ClientResponse, replica: Replica) -> dict[str, str]:
    headers = {h: upstream.headers[h] for h in _RESPONSE_HEADERS if h in upstream.headers}
    headers[REPLICA_HEADER] = replica.url
    return headers


async def _send(
    request: web.Request, state: RouterState, replica: Replica, body: bytes, label: str, answer: _Answer
) -> web.StreamResponse | _Failed:
    """One attempt at `replica`: its answer, or why another replica should be tried."""
    assert state.session is not None, "the session opens at the application's startup"
    replica.inflight += 1
    replica.requests += 1
    state.metrics.requests.labels(replica.url, label).inc()
    try:
        async with state.session.request(
            request.method, replica.url + request.rel_url.path_qs, data=body or None,
            headers=_request_headers(request),
        ) as upstream:
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream") and upstream.status == 200:
                return await _stream_through(request, state, replica, upstream, answer)
            payload = await upstream.read()
            reply = web.Response(body=payload, status=upstream.status, headers=_response_headers(upstream, replica))
            if upstream.status in _RETRY_STATUSES:
                state.wake.set()  # overloaded, draining or failed: let the health checks tell
                return _Failed("status", reply)
            if upstream.status == 200:
                answer.add_body(payload)
                answer.record(state, replica)
            return reply
    except _UPSTREAM_ERRORS as exc:
        logger.warning("replica %s failed a request (%r): out of the rotation until healthy", replica.url, exc)
        state.mark(replica, False, f"request failed: {exc!r}")
        return _Failed("connection", None)
    finally:
        replica.inflight -= 1


async def _stream_through(
    request: web.Request, state: RouterState, replica: Replica, upstream: aiohttp.ClientResponse, answer: _Answer
) -> web.StreamResponse:
    resp = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream, replica))
    await resp.prepare(request)
    chunks = upstream.content.iter_any().__aiter__()
    pending = b""
    done = False
    cut: str | None = None
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except _UPSTREAM_ERRORS as exc:
                cut = repr(exc)
                break
            *events, pending = (pending + chunk).split(b"\n\n")
            for event in events:
                await resp.write(event + b"\n\n")
                event = event.strip()
                done = done or _is_last(event)
                answer.add_event(event)
        if done:
            answer.record(state, replica)
        else:
            cut = cut or "the replica closed the stream before its end"
            logger.warning("replica %s cut a stream: %s", replica.url, cut)
            state.metrics.stream_cuts.inc()
            state.wake.set()
            error = ApiError(502, f"the replica serving this stream failed mid-way ({cut})", code="replica_failed")
            await resp.write(_cut_events(answer.route, error))
        await resp.write_eof()
    except ConnectionResetError:  # the client went away; leaving `upstream` closes it, so the replica aborts
        logger.debug("client disconnected from a stream of %s", replica.url)
    return resp


def _cut_events(route: str, error: ApiError) -> bytes:
    """The end of a stream that a replica cut, as the server ends one that fails: an error event and
    [DONE]; on /v1/responses, its `error` event (which ends such a stream)."""
    body = error.body()
    if route == "responses":
        event = {"type": "error", "code": error.code, "message": error.message, "param": None, "error": body["error"]}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


async def fan_out(state: RouterState, request: web.Request, path: str) -> dict[str, Any]:
    """POST `path` to every healthy replica; {url: (status, JSON body or text)}."""
    assert state.session is not None, "the session opens at the application's startup"
    session = state.session

    async def one(replica: Replica) -> tuple[str, Any]:
        try:
            async with session.post(replica.url + path, headers=_request_headers(request)) as up:
                text = await up.text()
                with contextlib.suppress(ValueError):
                    return replica.url, (up.status, json.loads(text))
                return replica.url, (up.status, text)
        except _UPSTREAM_ERRORS as exc:
            return replica.url, (502, repr(exc))

    return dict(await asyncio.gather(*(one(r) for r in state.replicas.healthy())))
