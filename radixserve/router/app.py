"""The router's aiohttp application and its lifecycle: the same HTTP API as `radixserve serve`,
answered by replicas.

    serve_router(RouterConfig(replicas=("http://127.0.0.1:8001", ...)))   # blocking; SIGTERM drains
    with BackgroundRouter(config) as router:                               # its own thread and loop
        requests.post(router.url + "/v1/chat/completions", ...)

Every route of the server is forwarded (generation routes routed by their prompt,
the others to the least loaded replica), except `/health`, `/metrics` (the
router's own), `/flush_cache` (sent to every replica) and the admin routes under
`/router/`. The API key, when set, is checked here on every route but `/health`
and passed on to the replicas with the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aiohttp
from aiohttp import web

from radixserve.router.admin import ROUTES as ADMIN_ROUTES
from radixserve.router.admin import check_all, health_loop
from radixserve.router.proxy import forward
from radixserve.router.state import ROUTER, RouterConfig, RouterState
from radixserve.server.auth import check_api_key
from radixserve.server.openai_api import ApiError
from radixserve.server.transport import (
    AccessLogger,
    BackgroundLoop,
    TimedAppRunner,
    arm_body_deadline,
    escape_log,
    http_error,
    json_response,
    listening_url,
)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

# (method, path, the body's kind for request_key, or None: no prompt to route by)
FORWARDED = (
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat"),
    ("POST", "/generate", "generate"),
    ("POST", "/v1/embeddings", "embeddings"),
    ("POST", "/v1/responses", "responses"),
    ("GET", "/v1/responses/{response_id}", "response_get"),
    ("POST", "/tokenize", None),
    ("POST", "/detokenize", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/{model}", None),
    ("GET", "/version", None),
)
_OPEN_PATHS = ("/health",)
_CUT_GRACE_S = 1.0


def build_router_app(config: RouterConfig) -> web.Application:
    app = web.Application(middlewares=[_errors, _body_deadline, _draining, _auth],
                          client_max_size=config.server.max_body_bytes)
    state = app[ROUTER] = RouterState(config)
    for method, path, route in FORWARDED:
        app.router.add_route(method, path, functools.partial(_forward, route=route))
    for method, path, handler in ADMIN_ROUTES:
        app.router.add_route(method, path, handler)

    async def session_and_health(app: web.Application) -> AsyncIterator[None]:
        # No limit on connections (aiohttp's default of 100 would queue the 101st stream), and the connect
        # timeout on the socket alone: waiting for a pooled connection is not a replica failing.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
        state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                              auto_decompress=False)
        await check_all(state)  # before the first request: who is up
        checker = asyncio.create_task(health_loop(state))
        yield
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        await state.session.close()

    app.cleanup_ctx.append(session_and_health)
    return app


async def _forward(request: web.Request, route: str | None) -> web.StreamResponse:
    return await forward(request, route)


# -- middlewares ---------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[ROUTER]
    state.inflight += 1
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = http_error(exc)
    except asyncio.CancelledError:
        state.metrics.responses.labels(route, "499").inc()
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, escape_log(request.path))
        resp = json_response(ApiError(500, "internal server error").body(), status=500)
    finally:
        state.inflight -= 1
    state.metrics.responses.labels(route, str(resp.status)).inc()
    return resp


@web.middleware
async def _body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    timer = arm_body_deadline(request, request.app[ROUTER].config.server.body_timeout)
    try:
        return await handler(request)
    finally:
        if timer is not None and request.content.is_eof():
            timer.cancel()


@web.middleware
async def _draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[ROUTER].draining and request.path not in ("/health", "/metrics"):
        raise ApiError(503, "the router is shutting down", code="shutting_down", headers={"Connection": "close"})
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[ROUTER].config.server.api_key
    if key is not None and request.path not in _OPEN_PATHS:
        check_api_key(request, key)
    return await handler(request)


# -- lifecycle -----------------------------------------------------------------------------


async def run_router(
    app: web.Application, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None
) -> int:
    """Listen until `stop` is set, then drain: refuse new requests, let those in flight finish
    (up to the drain timeout; then their connections are closed), close. Returns 0."""
    state = app[ROUTER]
    config = state.config.server
    runner = TimedAppRunner(
        app, header_timeout=config.header_timeout, send_timeout=config.send_timeout,
        keepalive_timeout=config.keep_alive_timeout, handler_cancellation=True, shutdown_timeout=_CUT_GRACE_S,
        access_log_class=AccessLogger,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        url = listening_url(runner)
        logger.info("routing at %s over %d replicas (%s)", url, len(state.replicas), state.policy.name)
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        state.draining = True
        for s in list(runner.sites):
            await s.stop()
        deadline = time.monotonic() + config.drain_timeout
        while state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if state.inflight:
            logger.warning("drain timeout (%g s): closing %d requests still in flight", config.drain_timeout,
                           state.inflight)
    finally:
        await runner.cleanup()
    return 0


def serve_router(config: RouterConfig, on_ready: Callable[[str], None] | None = None,
                 stop: asyncio.Event | None = None) -> int:
    """Route until SIGTERM or SIGINT (or `stop`), then drain and return 0."""

    async def main() -> int:
        done = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        return await run_router(build_router_app(config), done, on_ready)

    return asyncio.run(main())


class BackgroundRouter(BackgroundLoop):
    """The router on its own thread and event loop (tests, notebooks, `serve --dp`)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__("router", "radixserve-router")
        self.config = config
        self.app = build_router_app(config)

    @property
    def state(self) -> RouterState:
        return self.app[ROUTER]

    def start(self, timeout: float = 60.0) -> BackgroundRouter:
        self._start(timeout)
        return self

    def __enter__(self) -> BackgroundRouter:
        return self.start()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the router's loop (the state is touched only there); its result as a future."""
        if self._loop is None:
            raise RuntimeError("the router is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
        await run_router(self.app, stop, on_ready)
