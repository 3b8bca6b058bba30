"""Data parallelism: replicas of the server behind a prefix-aware router (no engine, no torch).

`policy.py` (round robin, least load, cache-aware over approximate radix trees),
`keys.py` (a request's prompt as a key), `replicas.py` (replicas and health checks),
`proxy.py` (forwarding and streaming), `admin.py` (health, metrics, admin routes),
`app.py` (the application and its lifecycle), `state.py`, `metrics.py`,
`launch.py` (`radixserve serve --dp N`: replica processes on one host).
"""

from radixserve.router.app import BackgroundRouter, build_router_app, run_router, serve_router
from radixserve.router.policy import POLICIES, CacheAware, LeastLoad, PromptKey, RoundRobin, make_policy
from radixserve.router.state import RouterConfig

__all__ = [
    "POLICIES", "BackgroundRouter", "CacheAware", "LeastLoad", "PromptKey", "RoundRobin", "RouterConfig",
    "build_router_app", "make_policy", "run_router", "serve_router",
]
