"""The router's own routes: health, metrics, the cache flush fan-out, the replica admin routes,
and the health checker.

    GET    /router/replicas                 the replicas, with health, load and approximate cache size
    POST   /router/replicas   {"url": U}    add a replica (201; it joins the rotation once healthy)
    DELETE /router/replicas?url=U           remove one (its requests in flight finish); or {"url": U}
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from radixserve.router.proxy import fan_out
from radixserve.router.replicas import Replica, check_health
from radixserve.router.state import RouterState, router_of
from radixserve.server.openai_api import ApiError, bad_request
from radixserve.server.transport import json_response

logger = logging.getLogger(__name__)


# -- health checks ---------------------------------------------------------------------------


async def check_replica(state: RouterState, replica: Replica) -> None:
    assert state.session is not None, "the session opens at the application's startup"
    ok = await check_health(state.session, replica, state.config.health_timeout)
    if ok and not replica.healthy:
        logger.info("replica %s is healthy: in the rotation", replica.url)
    elif replica.healthy and not ok:
        logger.warning("replica %s is unhealthy: out of the rotation (%s)", replica.url, replica.last_error)
    state.mark(replica, ok)


async def check_all(state: RouterState) -> None:
    await asyncio.gather(*(check_replica(state, r) for r in state.replicas))


async def health_loop(state: RouterState) -> None:
    """Check every replica each `health_interval` seconds, or at once when `state.wake` is set.

    The application's startup has just checked them all (`check_all`), so the first round here
    waits its interval too: a second round at once would only race the first requests.
    """
    while True:
        try:
            await asyncio.wait_for(state.wake.wait(), state.config.health_interval)
        except asyncio.TimeoutError:
            pass
        state.wake.clear()  # a wake set while the checks below run asks for another round at once
        await check_all(state)


# -- routes ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = router_of(request)
    healthy = len(state.replicas.healthy())
    body = {"status": "ok", "healthy_replicas": healthy, "replicas": len(state.replicas)}
    if state.draining:
        return json_response(dict(body, status="draining"), status=503)
    if not healthy:
        return json_response(dict(body, status="no healthy replica"), status=503)
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    text = router_of(request).metrics.render()
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def flush_cache(request: web.Request) -> web.Response:
    """Flush every healthy replica's cache (and the router's approximate trees)."""
    state = router_of(request)
    answers = await fan_out(state, request, "/flush_cache")
    for url, (status, _) in answers.items():
        if status == 200:
            state.policy.forget(url)
    statuses = [status for status, _ in answers.values()]
    body = {"flushed": bool(answers) and all(s == 200 for s in statuses),
            "replicas": {url: {"status": s, "body": b} for url, (s, b) in answers.items()}}
    status = 200 if body["flushed"] else next((s for s in statuses if s != 200), 503)
    return json_response(body, status=status)


def _describe(state: RouterState, replica: Replica) -> dict[str, Any]:
    return replica.describe(state.policy.cached_tokens(replica.url))


async def list_replicas(request: web.Request) -> web.Response:
    state = router_of(request)
    return json_response({"policy": state.policy.name, "replicas": [_describe(state, r) for r in state.replicas]})


async def _url_param(request: web.Request) -> str:
    url = request.query.get("url")
    if url is None:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise bad_request("the request body is not valid JSON", code="invalid_json") from None
        url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str):
        raise bad_request("send the replica's base URL as {\"url\": \"http://host:port\"}", param="url")
    return url


async def add_replica(request: web.Request) -> web.Response:
    state = router_of(request)
    url = await _url_param(request)
    try:
        replica = state.add(url)
    except ValueError as exc:
        status = 409 if "already" in str(exc) else 400
        raise ApiError(status, str(exc), param="url",
                       code="replica_exists" if status == 409 else "invalid_value") from None
    logger.info("replica %s added", replica.url)
    await check_replica(state, replica)
    return json_response(_describe(state, replica), status=201)


async def remove_replica(request: web.Request) -> web.Response:
    state = router_of(request)
    url = await _url_param(request)
    try:
        replica = state.remove(url)
    except ValueError as exc:
        raise bad_request(str(exc), param="url") from None
    except KeyError:
        raise ApiError(404, f"{url} is not a replica of this router", param="url", code="replica_not_found") from None
    logger.info("replica %s removed (%d requests still in flight finish)", replica.url, replica.inflight)
    return json_response(_describe(state, replica))


ROUTES = (
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("POST", "/flush_cache", flush_cache),
    ("GET", "/router/replicas", list_replicas),
    ("POST", "/router/replicas", add_replica),
    ("DELETE", "/router/replicas", remove_replica),
)
