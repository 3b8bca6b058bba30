"""The replicas behind the router: their addresses, health and load, and the health checker.

A replica is in the rotation while healthy. It leaves on a failed health check
(connection error, timeout, any status but 200: a draining server's or a failed
engine's 503 included) or when a request to it cannot connect, and comes back on
the next health check that answers 200. Touched only on the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

logger = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """`http(s)://host:port[/prefix]` without a trailing slash; ValueError naming `url` otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"url must be a string such as 'http://127.0.0.1:8001', got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"url must be an http(s) URL such as 'http://127.0.0.1:8001', got {url!r}")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"url has a bad port: {url!r}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass
class Replica:
    url: str
    healthy: bool = False  # in the rotation; set by the first health check
    inflight: int = 0  # requests the router has sent and not seen finish
    requests: int = 0  # requests sent, retried ones included
    failures: int = 0  # failed health checks and connections
    last_error: str | None = None

    def describe(self, cached_tokens: int) -> dict:
        return {"url": self.url, "healthy": self.healthy, "inflight": self.inflight, "requests": self.requests,
                "failures": self.failures, "last_error": self.last_error, "approx_cached_tokens": cached_tokens}


class ReplicaSet:
    """The replicas in the order they were added (the policies' tie-break order)."""

    def __init__(self) -> None:
        self.replicas: dict[str, Replica] = {}

    def __iter__(self) -> Iterator[Replica]:  # a snapshot: the set may change while the caller iterates
        return iter(list(self.replicas.values()))

    def __len__(self) -> int:
        return len(self.replicas)

    def add(self, url: str) -> Replica:
        url = normalize_url(url)
        if url in self.replicas:
            raise ValueError(f"url: {url} is already a replica")
        replica = self.replicas[url] = Replica(url)
        return replica

    def remove(self, url: str) -> Replica:
        replica = self.replicas.pop(normalize_url(url), None)
        if replica is None:
            raise KeyError(url)
        return replica

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]


async def check_health(session: aiohttp.ClientSession, replica: Replica, timeout: float) -> bool:
    """GET /health once; whether it answered 200 (the replica's state is left to the caller)."""
    try:
        async with session.get(replica.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status == 200:
                return True
            body = (await resp.text())[:200]
            replica.last_error = f"/health answered {resp.status}: {body}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        replica.last_error = f"/health failed: {exc!r}"
    return False
