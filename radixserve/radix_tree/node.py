"""TreeNode: one edge of the radix tree, a run of tokens and the slots that hold them."""

from __future__ import annotations

from typing import Any, Hashable


class TreeNode:
    """A run of tokens (``key``) and the value pieces (``value``) that hold them.

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
        "key",
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
        key: tuple,
        value: Any,
        parent: TreeNode | None,
        namespace: Hashable,
        depth: int,
        now: float,
        priority: float,
    ) -> None:
        self.id = node_id
        self.key = key
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
    def is_root(self) -> bool:
        return self.parent is None and not self.key

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def attached(self) -> bool:
        """False once the node was evicted or dropped by ``reset``."""
        return self.parent is not None or not self.key

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, len={len(self.key)}, depth={self.depth}, "
            f"lock_ref={self.lock_ref}, children={len(self.children)}, "
            f"namespace={self.namespace!r})"
        )
