"""Routing policies: which replica a request goes to, given its prompt key and the replicas' loads.

    policy = make_policy("cache_aware", cache_tokens=1 << 20)
    policy.add("http://a:8000"); policy.add("http://b:8000")
    choice = policy.choose(key, {"http://a:8000": 3, "http://b:8000": 1})   # loads: requests in flight

`cache_aware` keeps, per replica, an approximate radix tree (`ApproxTree`) of the
prompt keys it has routed there, bounded like the replica's cache and LRU-evicted,
since the replica forgets old prefixes too. SGLang's rule decides:

  1. imbalanced (max load - min load > balance_abs and max load > balance_rel x min
     load): the least loaded replica, whatever the cache says;
  2. else the replica whose tree matches the longest prefix of the key, when the
     match covers at least `cache_threshold` of the key (ties: the less loaded);
  3. else the least loaded replica, ties broken by the smallest tree (least cached),
     so new prefixes spread over the replicas.

Whichever wins, the key is inserted into the winner's tree. `round_robin` and
`least_load` ignore the key. The live router (radixserve.router.app) and the
cluster simulation (radixserve.replay.cluster) run these very classes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple, Protocol

from radixserve.radix_tree import MatchResult, RadixTree

POLICIES = ("cache_aware", "round_robin", "least_load")
# Reasons a choice reports (a label of the router's decision counter).
REASONS = ("cache_match", "low_match", "imbalance", "no_key", "round_robin", "least_load")
# (and "response_owner": the router's own choice of the replica that stored a /v1/responses result)


class PromptKey(NamedTuple):
    """What the cache-aware policy matches: a prompt as ints, in a namespace (keys of different
    namespaces, e.g. text and token ids, never match each other)."""

    namespace: Hashable
    ids: Sequence[int]


class RouteChoice(NamedTuple):
    replica: str
    reason: str  # one of REASONS
    matched: int  # key elements the winner's approximate tree held (0 for policies without trees)
    key_len: int


class ApproxTree:
    """What the router believes one replica's prefix cache holds: the keys routed there.

    Invariant: `size <= max_tokens` after every `insert` (LRU leaves evicted first; the key
    being inserted, cut to `max_tokens`, is never evicted to make room for itself).
    """

    def __init__(self, max_tokens: int) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.tree = RadixTree(page_size=1, policy="lru")

    @property
    def size(self) -> int:
        return self.tree.total_size

    def match(self, key: PromptKey) -> MatchResult:
        return self.tree.match_prefix(key.ids, key.namespace)

    def insert(self, key: PromptKey, match: MatchResult | None = None) -> None:
        """Record `key` as cached; `match` is this tree's `match(key)` when the caller has it."""
        ids = key.ids[: self.max_tokens]
        m = match if match is not None else self.match(key)
        new = len(ids) - min(m.length, len(ids))
        if new <= 0:
            return
        over = self.tree.total_size + new - self.max_tokens
        if over > 0:
            self.tree.lock(m.node)  # the matched prefix stays: it is part of the key
            self.tree.evict(over)
            self.tree.unlock(m.node)
        self.tree.insert(ids, range(len(ids)), key.namespace)

    def clear(self) -> None:
        self.tree.reset()


class Policy(Protocol):
    name: str

    def add(self, replica: str) -> None: ...

    def remove(self, replica: str) -> None: ...

    def forget(self, replica: str) -> None:
        """The replica lost its cache (it failed or restarted)."""

    def choose(self, key: PromptKey | None, loads: Mapping[str, int]) -> RouteChoice:
        """One of `loads`' replicas (at least one; their order is the tie-break order)."""

    def record(self, replica: str, key: PromptKey) -> None:
        """`replica` now caches `key` too (a prompt with its answer)."""

    def cached_tokens(self, replica: str) -> int: ...


class _Rotation:
    """Ties broken in turn, so equal replicas share the work instead of the first taking it all."""

    def __init__(self) -> None:
        self.replicas: list[str] = []
        self.next = 0

    def add(self, replica: str) -> None:
        if replica not in self.replicas:
            self.replicas.append(replica)

    def remove(self, replica: str) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)

    def order(self, replica: str) -> int:
        """0 for the replica whose turn it is, then the next ones; unknown replicas last."""
        n = len(self.replicas)
        if replica not in self.replicas:
            return n
        return (self.replicas.index(replica) - self.next) % n

    def least_loaded(self, loads: Mapping[str, int], tiebreak: Mapping[str, int] | None = None) -> str:
        if not loads:
            raise ValueError("loads must name at least one replica")
        best = min(loads, key=lambda r: (loads[r], (tiebreak or {}).get(r, 0), self.order(r)))
        self.next = (self.next + 1) % max(1, len(self.replicas))
        return best


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._rot = _Rotation()

    def add(self, replica: str) -> None:
        self._rot.add(replica)

    def remove(self, replica: str) -> None:
        self._rot.remove(replica)

    def forget(self, replica: str) -> None:
        pass

    def record(self, replica: str, key: PromptKey) -> None:
        pass

    def choose(self, key: PromptKey | None, loads: Mapping[str, int]) -> RouteChoice:
        if not loads:
            raise ValueError("loads must name at least one replica")
        for replica in loads:
            self._rot.add(replica)
        best = min(loads, key=self._rot.order)  # the first at or after the turn's position
        self._rot.next = (self._rot.replicas.index(best) + 1) % len(self._rot.replicas)
        return RouteChoice(best, "round_robin", 0, len(key.ids) if key else 0)

    def cached_tokens(self, replica: str) -> int:
        return 0


class LeastLoad(RoundRobin):
    name = "least_load"

    def choose(self, key: PromptKey | None, loads: Mapping[str, int]) -> RouteChoice:
        for replica in loads:
            self._rot.add(replica)
        return RouteChoice(self._rot.least_loaded(loads), "least_load", 0, len(key.ids) if key else 0)


class CacheAware:
    name = "cache_aware"

    def __init__(
        self, cache_tokens: int, cache_threshold: float = 0.3, balance_abs: int = 32, balance_rel: float = 1.1
    ) -> None:
        if isinstance(cache_tokens, bool) or not isinstance(cache_tokens, int) or cache_tokens < 1:
            raise ValueError(f"cache_tokens must be an integer >= 1, got {cache_tokens!r}")
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold!r}")
        if isinstance(balance_abs, bool) or not isinstance(balance_abs, int) or balance_abs < 0:
            raise ValueError(f"balance_abs must be an integer >= 0, got {balance_abs!r}")
        if not balance_rel >= 1.0:
            raise ValueError(f"balance_rel must be >= 1, got {balance_rel!r}")
        self.cache_tokens = cache_tokens
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.trees: dict[str, ApproxTree] = {}
        self._rot = _Rotation()

    def add(self, replica: str) -> None:
        self._rot.add(replica)
        self.trees.setdefault(replica, ApproxTree(self.cache_tokens))

    def remove(self, replica: str) -> None:
        self._rot.remove(replica)
        self.trees.pop(replica, None)

    def forget(self, replica: str) -> None:
        if replica in self.trees:
            self.trees[replica].clear()

    def record(self, replica: str, key: PromptKey) -> None:
        tree = self.trees.get(replica)
        if tree is not None:
            tree.insert(key)

    def cached_tokens(self, replica: str) -> int:
        tree = self.trees.get(replica)
        return tree.size if tree is not None else 0

    def imbalanced(self, loads: Mapping[str, int]) -> bool:
        hi, lo = max(loads.values()), min(loads.values())
        return hi - lo > self.balance_abs and hi > self.balance_rel * lo

    def choose(self, key: PromptKey | None, loads: Mapping[str, int]) -> RouteChoice:
        if not loads:
            raise ValueError("loads must name at least one replica")
        for replica in loads:
            if replica not in self.trees:
                self.add(replica)
        n = len(key.ids) if key is not None else 0
        if key is None or n == 0:
            return RouteChoice(self._rot.least_loaded(loads), "no_key", 0, 0)
        matches = {r: self.trees[r].match(key) for r in loads}
        if self.imbalanced(loads):
            best, reason = self._rot.least_loaded(loads), "imbalance"
        else:
            best = max(loads, key=lambda r: (matches[r].length, -loads[r], -self._rot.order(r)))
            reason = "cache_match"
            if matches[best].length < self.cache_threshold * n or matches[best].length == 0:
                sizes = {r: self.trees[r].size for r in loads}
                best, reason = self._rot.least_loaded(loads, sizes), "low_match"
        self.trees[best].insert(key, matches[best])
        return RouteChoice(best, reason, matches[best].length, n)


def make_policy(
    name: str, cache_tokens: int = 1 << 20, cache_threshold: float = 0.3, balance_abs: int = 32,
    balance_rel: float = 1.1,
) -> Policy:
    if name == "cache_aware":
        return CacheAware(cache_tokens, cache_threshold, balance_abs, balance_rel)
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
