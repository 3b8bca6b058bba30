"""The router's configuration, and the state its handlers share (touched only on its event loop)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from radixserve.router.metrics import RouterMetrics
from radixserve.router.policy import POLICIES, Policy, make_policy
from radixserve.router.replicas import Replica, ReplicaSet, normalize_url
from radixserve.server.state import ServerConfig


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...] = ()  # base URLs; more can join at run time (POST /router/replicas)
    policy: str = "cache_aware"
    # Cache-aware routing: each replica's approximate tree holds at most this many key elements
    # (about tokens: set it to the replicas' KV cache size), SGLang's thresholds.
    cache_tokens: int = 1 << 20
    cache_threshold: float = 0.3  # below this share of the key matched, the least loaded replica
    balance_abs: int = 32  # imbalanced when max - min in-flight requests > balance_abs ...
    balance_rel: float = 1.1  # ... and max > balance_rel x min: then the least loaded replica
    health_interval: float = 5.0  # seconds between health checks of every replica
    health_timeout: float = 5.0
    connect_timeout: float = 5.0  # to open a connection to a replica (then the next one is tried)
    max_attempts: int = 3  # replicas one request may be sent to before it fails
    server: ServerConfig = field(default_factory=ServerConfig)  # host, port, API key, body limit, timeouts

    def __post_init__(self) -> None:
        for url in self.replicas:
            normalize_url(url)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        make_policy(self.policy, self.cache_tokens, self.cache_threshold, self.balance_abs, self.balance_rel)
        for name in ("health_interval", "health_timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")


class RouterState:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.replicas = ReplicaSet()
        self.policy: Policy = make_policy(config.policy, config.cache_tokens, config.cache_threshold,
                                          config.balance_abs, config.balance_rel)
        for url in config.replicas:
            self.policy.add(self.replicas.add(url).url)
        self.metrics = RouterMetrics(self.replicas, self.policy.cached_tokens)
        self.session: aiohttp.ClientSession | None = None  # opened at the application's startup
        self.inflight = 0  # client requests inside a handler
        self.draining = False
        self.wake = asyncio.Event()  # set to run the health checks now
        self.response_owners = ResponseOwners()

    def add(self, url: str) -> Replica:
        replica = self.replicas.add(url)
        self.policy.add(replica.url)
        return replica

    def remove(self, url: str) -> Replica:
        replica = self.replicas.remove(url)
        self.policy.remove(replica.url)
        return replica

    def mark(self, replica: Replica, healthy: bool, error: str | None = None) -> None:
        """Put `replica` in or out of the rotation; out forgets its approximate cache."""
        if error is not None:
            replica.last_error = error
        if not healthy:
            replica.failures += 1
        if healthy == replica.healthy:
            return
        replica.healthy = healthy
        self.metrics.health_changes.labels(replica.url, "up" if healthy else "down").inc()
        if not healthy:
            self.policy.forget(replica.url)


class ResponseOwners:
    """Which replica stored each /v1/responses result (its store is in that process's memory), so that
    `previous_response_id` and GET /v1/responses/{id} reach it. The most recent `capacity` ids are kept."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.owners: OrderedDict[str, str] = OrderedDict()

    def add(self, response_id: str, replica: str) -> None:
        self.owners[response_id] = replica
        self.owners.move_to_end(response_id)
        while len(self.owners) > self.capacity:
            self.owners.popitem(last=False)

    def get(self, response_id: object) -> str | None:
        return self.owners.get(response_id) if isinstance(response_id, str) else None


ROUTER: web.AppKey[RouterState] = web.AppKey("radixserve_router")


def router_of(request: web.Request) -> RouterState:
    return request.app[ROUTER]
