"""What the router must know of the Responses API (/v1/responses, stored in a replica's memory), and how
it ends streams a replica cuts, against stand-in replicas whose answers the test controls.

A stored response lives in the replica that made it: `previous_response_id` and GET
/v1/responses/{id} must reach that replica. A Responses stream ends with its last named event, not
`data: [DONE]`: the router must not take that for a cut. A stream cut mid-way ends with the error
event of its kind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from helpers.server import http, sse_events

from radixserve.router import BackgroundRouter, RouterConfig
from radixserve.router.proxy import REPLICA_HEADER
from radixserve.server import ServerConfig


class StandIn:
    """A replica that answers /health, /v1/responses (storing ids) and /v1/completions streams that
    stop after one event when `cut` is set."""

    ids = itertools.count()

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.cut = False
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/responses", self._create)
        app.router.add_get("/v1/responses/{rid}", self._get)
        app.router.add_post("/v1/completions", self._complete)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error",
                                                "param": "previous_response_id", "code": "not_found"}}, status=404)
        rid = f"resp_{next(self.ids)}"
        self.stored.add(rid)
        done = {"id": rid, "object": "response", "status": "completed", "previous_response_id": previous}
        if not body.get("stream"):
            return web.json_response(done)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [("response.created", {"response": dict(done, status="in_progress")}),
                  ("response.output_text.delta", {"delta": "Hi"}), ("response.completed", {"response": done})]
        for name, data in events:
            if self.cut and name == "response.completed":
                request.transport.close()
                return resp
            await resp.write(f"event: {name}\ndata: {json.dumps(dict(data, type=name))}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _get(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        if rid not in self.stored:
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error",
                                                "param": "response_id", "code": "not_found"}}, status=404)
        return web.json_response({"id": rid, "object": "response"})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "Once"}]}\n\n')
        if self.cut:
            await resp.write(b'data: {"choices": [{"index": 0, "te')  # half an event, then the connection drops
            request.transport.close()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def __enter__(self) -> StandIn:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def cluster() -> Iterator[tuple[BackgroundRouter, list[StandIn]]]:
    with StandIn() as a, StandIn() as b, StandIn() as c:
        config = RouterConfig(replicas=(a.url, b.url, c.url), policy="round_robin", health_interval=60.0,
                              server=ServerConfig(port=0))
        with BackgroundRouter(config) as router:
            yield router, [a, b, c]


def test_stored_responses_are_reached_where_they_live(cluster):
    router, replicas = cluster
    for stream in (False, True):
        status, headers, first = http(router.url + "/v1/responses", "POST", {"input": "Hi", "stream": stream})
        assert status == 200
        owner = headers[REPLICA_HEADER]
        rid = first["id"] if not stream else sse_events(first)[0]["response"]["id"]
        for _ in range(4):  # round robin would spread these over all three; each must reach the owner
            status, headers, answer = http(router.url + "/v1/responses", "POST",
                                           {"input": "And?", "previous_response_id": rid})
            assert status == 200 and headers[REPLICA_HEADER] == owner, answer
            rid = answer["id"]
            status, headers, _ = http(router.url + f"/v1/responses/{rid}")
            assert status == 200 and headers[REPLICA_HEADER] == owner
    # An id the router never saw goes wherever the policy says, and that replica answers.
    assert http(router.url + "/v1/responses/resp_unknown")[0] == 404


def test_a_responses_stream_ends_with_its_last_event_not_done(cluster):
    router, _ = cluster
    status, _, text = http(router.url + "/v1/responses", "POST", {"input": "Hi", "stream": True})
    events = sse_events(text)
    assert status == 200 and [e["type"] for e in events] == [
        "response.created", "response.output_text.delta", "response.completed"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/responses"])
def test_a_cut_stream_ends_with_an_error_event(cluster, route):
    router, replicas = cluster
    for r in replicas:
        r.cut = True
    status, _, text = http(router.url + route, "POST", {"prompt": "x", "input": "x", "stream": True})
    events = sse_events(text)
    assert status == 200
    if route == "/v1/completions":
        assert events[0]["choices"][0]["text"] == "Once"  # the whole events before the cut, not the half one
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_failed" and len(events) == 3
        assert "event:" not in text
    else:
        assert [e["type"] for e in events] == ["response.created", "response.output_text.delta", "error"]
        assert events[-1]["code"] == "replica_failed" and "event: error\n" in text
