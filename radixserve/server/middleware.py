"""The middlewares of the server and the router, outermost first, over either one's state:

    errors         every error as an OpenAI-style JSON body, an unexpected one a logged 500;
                   counts the requests inside a handler (the drain waits for them) and each answer
    body_deadline  a body not all arrived within `body_timeout` fails its reader: a 408, and the
                   connection closes
    draining       a 503 once the application drains, on every route but /health and /metrics
    auth           the API key, when set, on every route but /health: `Authorization: Bearer <key>`

    web.Application(middlewares=middlewares(config, "server", state, count_answer))

Imports neither the engine nor torch (the router uses it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from radixserve.server.errors import ApiError
from radixserve.server.transport import BodyTimeout, HttpState, arm_body_deadline, escape_log, http_error, json_response

if TYPE_CHECKING:
    from radixserve.server.state import ServerConfig

logger = logging.getLogger(__name__)

# Called once per answer with its route (the canonical path, "unmatched" for none) and status;
# 499 (nginx's code) when the client closed the connection first.
CountAnswer = Callable[[web.Request, str, int], None]

_OPEN_PATHS = ("/health",)  # answered without the API key (load balancers' probes)
_WHILE_DRAINING = ("/health", "/metrics")  # still answered while draining


def middlewares(config: ServerConfig, name: str, state: HttpState, count: CountAnswer) -> list[Middleware]:
    """The four middlewares of the application whose state is `state`, configured by `config` (body
    timeout, API key) and called `name` in the 503 of its drain ("the server is shutting down")."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
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
            count(request, route, 499)
            raise
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, escape_log(request.path))
            resp = json_response(ApiError(500, "internal server error").body(), status=500)
        finally:
            state.inflight -= 1
        count(request, route, resp.status)
        return resp

    @web.middleware
    async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        timer = arm_body_deadline(request, config.body_timeout)
        try:
            return await handler(request)
        except BodyTimeout:  # from the handler's read of the body
            raise ApiError(408, f"the request body did not arrive within {config.body_timeout:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        finally:
            if timer is not None and request.content.is_eof():
                timer.cancel()  # else it stays armed for aiohttp's read of the unread rest of the body

    @web.middleware
    async def draining(request: web.Request, handler: Handler) -> web.StreamResponse:
        if state.draining and request.path not in _WHILE_DRAINING:
            raise ApiError(503, f"the {name} is shutting down", code="shutting_down", headers={"Connection": "close"})
        return await handler(request)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if config.api_key is not None and request.path not in _OPEN_PATHS:
            check_api_key(request, config.api_key)
        return await handler(request)

    return [errors, body_deadline, draining, auth]


def check_api_key(request: web.BaseRequest, key: str) -> None:
    """Raise a 401 `ApiError` unless `request` carries `Authorization: Bearer <key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: encode them back, never fail.
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, key.encode("utf-8", "surrogateescape")):
        message = "Incorrect API key provided" if header else "Missing API key: send 'Authorization: Bearer <key>'"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
