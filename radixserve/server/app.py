"""The aiohttp HTTP server: the application, its lifecycle (graceful drain), background mode.

The engine runs its loop on its own thread (`Engine`), so a slow step never
blocks the event loop; anything that takes the engine's step lock (stats,
flush) or may be slow (tokenizing a long prompt) runs in a worker thread.

    serve(engine, ServerConfig(port=8000))              # blocking; SIGTERM/SIGINT drain then return
    with BackgroundServer(engine, ServerConfig(port=0)) as srv:   # its own thread and loop
        requests.get(srv.url + "/health")

Errors are OpenAI-style, `{"error": {"message", "type", "param", "code"}}`,
and a client's mistake is always a 4xx: unknown routes, wrong methods and
oversized bodies included. An unexpected exception is a logged 500 and the
server keeps serving. A connection that is idle, or sends its request too
slowly, is closed (transport.py); at shutdown, requests still running
after the drain timeout are cut with a 503 or a last error event.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from radixserve.server.middleware import middlewares
from radixserve.server.responses_api import ROUTES as RESPONSES_ROUTES
from radixserve.server.routes import ROUTES
from radixserve.server.state import STATE, ServerConfig, ServerState
from radixserve.server.tokenize import ROUTES as TOKENIZE_ROUTES
from radixserve.server.transport import BackgroundLoop, drain, listening, listening_url, requests_done

if TYPE_CHECKING:
    from radixserve.engine.engine import Engine

logger = logging.getLogger(__name__)

# After the drain timeout, how long cut requests get to send their last bytes, and then how long
# aiohttp waits for any other handler before cancelling it.
_CUT_GRACE_S = 1.0
_ENGINE_CHECK_S = 0.5  # how often the server checks that the engine's loop still runs


def build_app(engine: Engine, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application over a running `Engine` (which it does not own)."""
    config = config or ServerConfig()
    state = ServerState(engine, config)

    def count(request: web.Request, route: str, status: int) -> None:
        state.metrics.count_http(request.method, route, status)

    app = web.Application(middlewares=middlewares(config, "server", state, count),
                          client_max_size=config.max_body_bytes)
    app[STATE] = state
    for method, path, handler in ROUTES + TOKENIZE_ROUTES + RESPONSES_ROUTES:
        app.router.add_route(method, path, handler)
    return app


# -- lifecycle -----------------------------------------------------------------------------


async def run_app(
    app: web.Application, config: ServerConfig, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None
) -> int:
    """Listen until `stop` is set or the engine fails, then drain: refuse new requests, finish
    in-flight ones, close. Returns the exit status: 0, or 1 when the engine failed (fatal), so
    that a supervisor restarts the process instead of it answering 503s forever.

    In-flight requests get `drain_timeout` seconds; then each generation still running is cut
    (a 503, or a last error event and `[DONE]` on a stream it has started) and the server closes
    within about a second more.
    """
    state = app[STATE]
    watchdog = asyncio.create_task(_watch_engine(state, stop))
    try:
        await _listen(app, config, stop, on_ready)
    finally:
        watchdog.cancel()
    if not state.engine_alive():
        logger.critical("exiting: the engine failed: %r", state.engine.fatal_error)
        return 1
    return 0


async def _watch_engine(state: ServerState, stop: asyncio.Event) -> None:
    """Set `stop` once the engine's loop has stopped (a fatal error: logged by the engine)."""
    while state.engine_alive():
        await asyncio.sleep(_ENGINE_CHECK_S)
    stop.set()


async def _listen(
    app: web.Application, config: ServerConfig, stop: asyncio.Event, on_ready: Callable[[str], None] | None
) -> None:
    state = app[STATE]
    try:
        async with listening(app, config, _CUT_GRACE_S) as runner:
            url = listening_url(runner)
            logger.info("serving %s at %s", state.model_name, url)
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            if not await drain(runner, state, config.drain_timeout):
                logger.warning("drain timeout (%g s): cutting %d requests still in flight", config.drain_timeout,
                               state.inflight)
                for gen in list(state.generations):
                    gen.cut(config.drain_timeout)
                await requests_done(state, _CUT_GRACE_S)
    finally:
        # Aborted requests' last deltas are posted to this loop: let them land before it closes.
        await asyncio.to_thread(state.engine.wait_idle, 30.0)


def serve(engine: Engine, config: ServerConfig | None = None, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and return 0 (the engine stays
    up); or, once the engine has failed (fatal), drain and return 1."""
    config = config or ServerConfig()

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_app(build_app(engine, config), config, stop, on_ready)

    return asyncio.run(main())


class BackgroundServer(BackgroundLoop):
    """The server on its own thread and event loop, for tests and notebooks.

    >>> with BackgroundServer(engine, ServerConfig(port=0)) as srv:
    ...     print(srv.url)
    """

    def __init__(self, engine: Engine, config: ServerConfig | None = None) -> None:
        super().__init__("HTTP server", "radixserve-http")
        self.app = build_app(engine, config or ServerConfig(port=0))
        self.config = self.app[STATE].config
        self.exit_status: int | None = None  # run_app's, once the server has stopped

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
        self.exit_status = await run_app(self.app, self.config, stop, on_ready)


def curl_example(url: str, model: str, api_key: bool = False) -> str:
    """What the CLI prints on start: a chat request to try."""
    auth = " -H 'Authorization: Bearer <api-key>'" if api_key else ""
    body = (f'{{"model": "{model}", "messages": [{{"role": "user", "content": '
            f'"What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}')
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n  -d '{body}'"
