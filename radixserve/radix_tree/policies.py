"""Eviction policies: each one is a sort key over a node; smallest key is evicted first.

To add a policy, write a function ``TreeNode -> tuple`` of the fields it ranks
by and add an ``EvictionPolicy`` to ``POLICIES`` (or pass the instance straight
to ``RadixTree(policy=...)``). The tree appends the node id to every key, so
ties are broken by creation order and keys never need to be unique. A key may
read ``last_access``, ``hit_count``, ``created``, ``priority``, ``key``,
``depth``: the tree re-files a node in its evictable set whenever it changes
any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from radixserve.radix_tree.node import TreeNode


@dataclass(frozen=True)
class EvictionPolicy:
    name: str
    sort_key: Callable[[TreeNode], tuple]
    description: str = ""


def _lru_key(node: TreeNode) -> tuple:
    return (node.last_access,)


def _lfu_key(node: TreeNode) -> tuple:
    return (node.hit_count, node.last_access)


def _fifo_key(node: TreeNode) -> tuple:
    return (node.created,)


def _priority_key(node: TreeNode) -> tuple:
    return (node.priority, node.last_access)


POLICIES: Mapping[str, EvictionPolicy] = MappingProxyType(
    {
        "lru": EvictionPolicy("lru", _lru_key, "least recently accessed first"),
        "lfu": EvictionPolicy("lfu", _lfu_key, "fewest hits first, then least recent"),
        "fifo": EvictionPolicy("fifo", _fifo_key, "oldest inserted first"),
        "priority": EvictionPolicy(
            "priority", _priority_key, "lowest priority first, then least recent"
        ),
    }
)


def resolve_policy(policy: str | EvictionPolicy) -> EvictionPolicy:
    """Returns the policy named ``policy`` (or ``policy`` itself if it is one)."""
    if isinstance(policy, EvictionPolicy):
        return policy
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(name) for name in POLICIES)
        raise ValueError(
            f"policy must be one of {allowed} or an EvictionPolicy, got {policy!r}"
        ) from None
