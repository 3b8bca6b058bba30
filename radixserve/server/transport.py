"""Below the routes: deadlines on reading a request, an access log line a client cannot forge, and
an application's life (listening, draining, on a thread of its own), for the server and the router.

A connection may take at most

    keep_alive_timeout  from its opening, or the end of its last response, to the first byte of a request
    header_timeout      from that first byte to the end of the request's head (request line and headers)
    body_timeout        from the end of the head to the end of the body

and is closed otherwise (a late body is answered 408 first if a handler is reading it). Nor may
a client stop reading its answer: once the server's send buffer is full, `send_timeout` seconds
without it draining close the connection, which cancels the handler and aborts its sequences
(a handler stuck on a write would otherwise hold its admission slot forever).

aiohttp gives the first (`keepalive_timeout`; bytes that arrive do not reset it) and no knob
for the others: `_Connection` adds the head and send deadlines inside aiohttp's connection
protocol, and `arm_body_deadline` fails a late body's stream with `BodyTimeout`, which ends both
a handler's read and aiohttp's lingering read of a body nobody read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from radixserve.server.errors import ApiError

if TYPE_CHECKING:
    from radixserve.server.state import ServerConfig

logger = logging.getLogger(__name__)


class BodyTimeout(asyncio.TimeoutError):
    """Set on a request's body stream when the body did not arrive within the body timeout.

    A TimeoutError, so that aiohttp's lingering read of an unread body ends quietly on it.
    """


def arm_body_deadline(request: web.BaseRequest, timeout: float) -> asyncio.TimerHandle | None:
    """Fail `request`'s body stream with `BodyTimeout` unless the whole body has arrived within `timeout`.

    None when there is nothing left to wait for (no body, or all of it already here). The timer
    is harmless once the body is complete; cancel it then to drop its reference to the request.
    """
    payload = request.content
    if payload.is_eof():
        return None

    def expire() -> None:
        if not payload.is_eof():
            logger.debug("closing %s: its request body did not arrive within %g s", escape_log(request.remote), timeout)
            payload.set_exception(BodyTimeout(f"the request body did not arrive within {timeout:g} s"))

    return asyncio.get_running_loop().call_later(timeout, expire)


class _Connection(RequestHandler):
    """aiohttp's connection protocol with a deadline on a request's head and on a stalled send.

    Uses four attributes of aiohttp's `RequestHandler` (the server transport tests check them):
    `_request_count` (heads parsed so far), `_request_in_progress` (a handler or its response
    is running), `_messages` (parsed requests waiting for their handler) and `_keepalive`.
    """

    __slots__ = ("_header_timeout", "_send_timeout", "_head_timer", "_send_timer", "_heads")

    def __init__(self, manager: web.Server, *, header_timeout: float, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._heads = 0  # `_request_count` when the head timer last started or stopped

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._heads:  # a head is complete: its deadline is met
            self._heads = self._request_count
            self._stop_head_timer()
        elif data and self._head_timer is None and not self._request_in_progress and not self._messages:
            # The first bytes of a head (a client sending a whole head at once never gets here).
            self.keep_alive(self._keepalive)  # stops aiohttp's idle timer (it starts again after the response)
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_expired)

    def pause_writing(self) -> None:  # asyncio: the send buffer is over its high-water mark
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_expired)

    def resume_writing(self) -> None:  # asyncio: the client took enough of it
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # A malformed request is the client's mistake (aiohttp answers 400): a debug line, not an
        # error with a traceback that any client could write to the log as often as it likes.
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            logger.debug("malformed request refused: %s", escape_log(str(exc)))
            return
        super().log_exception(*args, **kwargs)

    def _send_expired(self) -> None:
        self._send_timer = None
        if self.transport is not None:
            logger.debug("closing %s: it read nothing of its answer for %g s", self._peer(), self._send_timeout)
            self.transport.abort()  # close() would wait, forever, for the unsent bytes to go out

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return escape_log(str(peer))

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_count == self._heads and not self._request_in_progress:
            logger.debug("closing %s: its request head did not arrive within %g s", self._peer(), self._header_timeout)
            self.force_close()


class _Server(web.Server):
    """aiohttp's low-level server, making `_Connection`s."""

    def __init__(self, *args: Any, header_timeout: float, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, header_timeout=self.header_timeout,
                           send_timeout=self.send_timeout, **self._kwargs)


class TimedAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections have head and send deadlines (aiohttp takes no protocol class to use)."""

    def __init__(self, app: web.Application, *, header_timeout: float, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the application's startup; its server serves as the template
        return _Server(base.request_handler, request_factory=base.request_factory,
                       handler_cancellation=base.handler_cancellation, loop=base._loop,
                       header_timeout=self._header_timeout, send_timeout=self._send_timeout, **base._kwargs)


# -- access log ----------------------------------------------------------------------------


def escape_log(value: str | None) -> str:
    """`value` safe inside a double-quoted log field: quotes, backslashes, control and non-ASCII characters escaped.

    As nginx's `escape=default`: a client cannot end a field, start a line or hide bytes.
    """
    if value is None:
        return "-"
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class AccessLogger(AbstractAccessLogger):
    """One line per request on the `aiohttp.access` logger, everything the client sent escaped:

        127.0.0.1 "POST /v1/completions HTTP/1.1" 200 1234 0.052s "-" "OpenAI/Python 1.40.0"

    (remote, request line, status, body bytes, duration, Referer, User-Agent).
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        headers = request.headers
        version = f"{request.version.major}.{request.version.minor}"
        self.logger.info(
            '%s "%s %s HTTP/%s" %d %d %.3fs "%s" "%s"',
            escape_log(request.remote), escape_log(request.method), escape_log(request.raw_path), version,
            response.status, response.body_length, time, escape_log(headers.get("Referer")),
            escape_log(headers.get("User-Agent")),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


# -- an application's life -----------------------------------------------------------------


class HttpState(Protocol):
    """What the middlewares and the drain keep in an application's state (touched only on its event loop)."""

    inflight: int  # requests inside a handler
    draining: bool  # set at shutdown: new requests are refused with a 503


@contextlib.asynccontextmanager
async def listening(app: web.Application, config: ServerConfig, cut_grace: float) -> AsyncIterator[web.AppRunner]:
    """`app` listening at `config.host`:`config.port` (`listening_url(runner)`) with `config`'s connection
    deadlines and the access log. Leaving closes it: a handler still running gets `cut_grace` seconds,
    then is cancelled."""
    runner = TimedAppRunner(
        app, header_timeout=config.header_timeout, send_timeout=config.send_timeout,
        keepalive_timeout=config.keep_alive_timeout, handler_cancellation=True, shutdown_timeout=cut_grace,
        access_log_class=AccessLogger,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        yield runner
    finally:
        await runner.cleanup()


async def drain(runner: web.AppRunner, state: HttpState, timeout: float) -> bool:
    """Refuse new connections and requests, and wait up to `timeout` seconds for the requests in flight;
    whether they all finished."""
    state.draining = True
    for site in list(runner.sites):
        await site.stop()
    return await requests_done(state, timeout)


async def requests_done(state: HttpState, timeout: float) -> bool:
    """Wait up to `timeout` seconds for every request in flight to finish; whether they did."""
    deadline = time.monotonic() + timeout
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return not state.inflight


Loop = TypeVar("Loop", bound="BackgroundLoop")


class BackgroundLoop:
    """An app served on its own thread and event loop (tests, notebooks, `serve --dp`'s router).

    `serve(stop, on_ready)` runs until `stop` is set and calls `on_ready(url)` once listening;
    `start` waits for that and raises what made the thread fail. `what` names the app in errors.
    """

    def __init__(self, what: str, thread_name: str) -> None:
        self.url = ""
        self._what = what
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None]) -> Coroutine[Any, Any, None]:
        raise NotImplementedError

    def start(self: Loop, timeout: float = 60.0) -> Loop:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the {self._what} did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the {self._what} failed to start") from self._error
        return self

    def __enter__(self: Loop) -> Loop:
        return self.start()

    def stop(self, timeout: float = 120.0) -> None:
        """Drain and stop, as SIGTERM does. Idempotent."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.serve(self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            logger.exception("%s thread failed", self._what)
        finally:
            self._ready.set()

    def _on_ready(self, url: str) -> None:
        self.url = url
        self._ready.set()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


def http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) as an OpenAI-style error body,
    keeping the `Allow` header of a 405."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = f"the request body is too large: {exc.text}" if exc.status == 413 else exc.reason
    err = ApiError(exc.status, message, code=codes.get(exc.status))
    headers = {k: v for k, v in exc.headers.items() if k == "Allow"}
    return json_response(err.body(), status=exc.status, headers=headers)


def listening_url(runner: web.AppRunner) -> str:
    """The URL a started runner's first site listens at (IPv6 hosts in brackets)."""
    host, port = runner.addresses[0][:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
