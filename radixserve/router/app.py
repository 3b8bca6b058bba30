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
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import aiohttp
from aiohttp import web

from radixserve.router.admin import ROUTES as ADMIN_ROUTES
from radixserve.router.admin import check_all, health_loop
from radixserve.router.proxy import forward
from radixserve.router.state import ROUTER, RouterConfig, RouterState
from radixserve.server.middleware import middlewares
from radixserve.server.transport import BackgroundLoop, drain, listening, listening_url

logger = logging.getLogger(__name__)

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
_CUT_GRACE_S = 1.0


def build_router_app(config: RouterConfig) -> web.Application:
    state = RouterState(config)

    def count(request: web.Request, route: str, status: int) -> None:
        state.metrics.responses.labels(route, str(status)).inc()

    app = web.Application(middlewares=middlewares(config.server, "router", state, count),
                          client_max_size=config.server.max_body_bytes)
    app[ROUTER] = state
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


# -- lifecycle -----------------------------------------------------------------------------


async def run_router(
    app: web.Application, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None
) -> int:
    """Listen until `stop` is set, then drain: refuse new requests, let those in flight finish
    (up to the drain timeout; then their connections are closed), close. Returns 0."""
    state = app[ROUTER]
    config = state.config.server
    async with listening(app, config, _CUT_GRACE_S) as runner:
        url = listening_url(runner)
        logger.info("routing at %s over %d replicas (%s)", url, len(state.replicas), state.policy.name)
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        if not await drain(runner, state, config.drain_timeout):
            logger.warning("drain timeout (%g s): closing %d requests still in flight", config.drain_timeout,
                           state.inflight)
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

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the router's loop (the state is touched only there); its result as a future."""
        if self._loop is None:
            raise RuntimeError("the router is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
        await run_router(self.app, stop, on_ready)
