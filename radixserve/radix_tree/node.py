"""TreeNode: one edge of the radix tree, a run of tokens and the slots that hold them."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from radixserve.radix_tree.keys import TOKEN_BYTES, to_bytes, to_tuple


class TreeNode:
    """A run of tokens (``key``) and the value pieces (``value``) that hold them.

    The run is stored as ``key_bytes``: int64 tokens in native byte order, one
    ``bytes`` object however long the run (see keys.py). ``key`` gives it as a
    tuple of ints, built on each access.

    A root has an empty key and no parent; every other node has a non-empty key
    whose length is a multiple of the tree's page size. ``depth`` is the number
    of tokens from the root to the end of this node, i.e. the match length of a
    prefix that ends exactly here. A node taken out of the tree (evicted, or
    dropped by ``reset``) has ``parent is None`` and a non-empty key.

    Fields the eviction policies read (``last_access``, ``hit_count``,
    ``created``, ``priority``) are only changed by the tree, which takes the
    node out of its evictable set first and puts it back afterwards.
    """

    __slots__ = (
        "id",
        "key_bytes",
        "value",
        "children",
        "parent",
        "namespace",
        "depth",
        "lock_ref",
        "last_access",
        "hit_count",
        "created",
        "priority",
        "evict_entry",
    )

    def __init__(
        self,
        node_id: int,
        key_bytes: bytes,
        value: Any,
        parent: TreeNode | None,
        namespace: Hashable,
        depth: int,
        now: float,
        priority: float,
    ) -> None:
        self.id = node_id
        self.key_bytes = key_bytes
        self.value = value
        # Keyed by the child's first token (page_size 1) or first page tuple.
        self.children: dict[Any, TreeNode] = {}
        self.parent = parent
        self.namespace = namespace
        self.depth = depth
        self.lock_ref = 0
        self.last_access = now
        self.hit_count = 0
        self.created = now
        self.priority = priority
        # The entry under which this node sits in the tree's evictable set,
        # or None. Non-None exactly when the node is an unlocked, attached leaf.
        self.evict_entry: tuple | None = None

    @property
    def key(self) -> tuple[int, ...]:
        """The node's tokens as a tuple (a copy; the tree reads ``key_bytes``)."""
        return to_tuple(self.key_bytes)

    @key.setter
    def key(self, tokens: Sequence[int]) -> None:
        self.key_bytes = to_bytes(tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.key_bytes) // TOKEN_BYTES

    @property
    def is_root(self) -> bool:
        return self.parent is None and not self.key_bytes

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def attached(self) -> bool:
        """False once the node was evicted or dropped by ``reset``."""
        return self.parent is not None or not self.key_bytes

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, len={self.num_tokens}, depth={self.depth}, "
            f"lock_ref={self.lock_ref}, children={len(self.children)}, "
            f"namespace={self.namespace!r})"
        )
