"""RadixTree: the cross-request prefix cache (RadixAttention).

The tree maps token prefixes to the value pieces (KV slot ids) that hold them.
It never copies or concatenates values: a node keeps a slice of what
``insert`` was given, and matches return a list of those slices.

    namespace None          namespace "lora-1"
        root                      root              (empty key, never locked,
       /    \\                      |                 dropped once it has no child)
   [1 2 3]  [7 8]               [1 2 3]
     |
   [4 5]   <- leaf, unlocked: in the evictable set

Keys are stored as int64 ``bytes`` (keys.py): a caller's numpy int64 array or
``array('q')`` is read in place, a run of tokens is compared with one memcmp,
and a node's key is one object to allocate and free, however long.

Size accounting, kept by every operation and verified by ``check()``:

    evictable_size = tokens in attached non-root nodes with lock_ref == 0
    protected_size = tokens in attached non-root nodes with lock_ref  > 0
    evictable set  = exactly the attached non-root leaves with lock_ref == 0,
                     each filed under (policy key, node id)
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from sortedcontainers import SortedList

from radixserve.radix_tree.keys import TOKEN_BYTES, common_tokens, first_page, key_views
from radixserve.radix_tree.node import TreeNode
from radixserve.radix_tree.policies import EvictionPolicy, resolve_policy
from radixserve.radix_tree.results import EvictResult, MatchResult

logger = logging.getLogger(__name__)


class _LogicalClock:
    """Default clock: ticks once per call, so runs are deterministic."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class RadixTree:
    """Prefix cache over token keys; see docs/radix_tree.md."""

    def __init__(
        self,
        page_size: int = 1,
        policy: str | EvictionPolicy = "lru",
        clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        if clock is not None and not callable(clock):
            raise ValueError(f"clock must be a zero-argument callable or None, got {clock!r}")
        self.page_size = page_size
        self.policy = resolve_policy(policy)
        self._sort_key = self.policy.sort_key
        self._clock = clock if clock is not None else _LogicalClock()
        self._roots: dict[Hashable, TreeNode] = {}
        self._evictable: SortedList = SortedList()
        self._next_id = 0
        self._evictable_size = 0
        self._protected_size = 0
        self._num_nodes = 0
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._inserted_tokens = 0
        self._evicted_tokens = 0

    # ------------------------------------------------------------------ sizes

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    # ------------------------------------------------------------- operations

    def match_prefix(self, key: Sequence[int], namespace: Hashable = None) -> MatchResult:
        """Longest cached prefix of ``key`` (whole pages only) in ``namespace``.

        Splits a node on a partial match so that ``node`` ends exactly at
        ``length``; locking ``node`` then protects every returned value piece.
        Touches (access time, hit count) every node on the matched path.
        """
        root = self._root(namespace)  # may raise: before views of the key exist
        tokens, raw = key_views(key)
        n = len(tokens)
        self._queried_tokens += n
        end = n - n % self.page_size
        if root is None or not end:
            if root is None:  # a stand-in, so that m.node.depth == 0 and lock is a no-op
                root = TreeNode(-1, b"", None, None, namespace, 0, 0.0, 0.0)
            return MatchResult(0, [], root)
        node, length, values = self._descend(root, tokens, raw, end, self._clock(), True, None)
        self._relist(node)
        self._hit_tokens += length
        return MatchResult(length, values, node)

    def insert(
        self,
        key: Sequence[int],
        value: Sequence[Any],
        namespace: Hashable = None,
        priority: float = 0.0,
    ) -> int:
        """Caches ``key -> value``; returns how many leading tokens were present.

        The tree keeps its own values for those tokens: the caller frees its
        duplicates ``value[its_own_cached_len:returned]``. Only whole pages are
        inserted; tokens past the last whole page stay the caller's. New nodes
        get ``priority``; nodes already on the path keep the larger of theirs
        and ``priority``.
        """
        root = self._root(namespace)  # may raise: before views of the key exist
        tokens, raw = key_views(key)
        n = len(tokens)
        if len(value) != n:
            # The traceback keeps this frame: drop the views of the caller's
            # buffer first, else its array('q') could not grow while it lives.
            del tokens, raw
            raise ValueError(f"insert: len(value) must equal len(key), got {len(value)} != {n}")
        end = n - n % self.page_size
        if end == 0:
            return 0
        if root is None:
            root = self._new_root(namespace)
        now = self._clock()
        node, present, _ = self._descend(root, tokens, raw, end, now, False, priority)
        if present < end:
            # The new leaf's first page differs from every child of ``node``,
            # else _descend would have gone on; ``node`` stops being a leaf.
            # Its key is the one copy of the caller's tokens the tree makes.
            leaf = TreeNode(
                self._new_id(), bytes(raw[TOKEN_BYTES * present : TOKEN_BYTES * end]),
                value[present:end], node, namespace, node.depth + end - present, now, priority,
            )
            p = self.page_size
            node.children[tokens[present] if p == 1 else tuple(tokens[present : present + p])] = leaf
            self._num_nodes += 1
            self._evictable_size += end - present
            self._inserted_tokens += end - present
            self._relist(leaf)
        else:
            self._relist(node)
        return present

    def lock(self, node: TreeNode) -> None:
        """lock_ref += 1 on ``node`` and every ancestor below the root."""
        self._require_attached(node, "lock")
        moved = 0
        while node.parent is not None:
            if node.lock_ref == 0:
                if node.evict_entry is not None:
                    self._unlist(node)
                moved += len(node.key_bytes)
            node.lock_ref += 1
            node = node.parent
        moved //= TOKEN_BYTES
        self._evictable_size -= moved
        self._protected_size += moved

    def unlock(self, node: TreeNode) -> None:
        """lock_ref -= 1 on ``node`` and every ancestor below the root."""
        self._require_attached(node, "unlock")
        if node.parent is not None and node.lock_ref <= 0:
            raise RuntimeError(
                f"unlock: lock_ref of {node!r} would go below 0 (unlock without lock)"
            )
        # Ancestors' lock_ref >= node's, so none of them can go below 0 either.
        moved = 0
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key_bytes)
                self._relist(node)
            node = node.parent
        moved //= TOKEN_BYTES
        self._evictable_size += moved
        self._protected_size -= moved

    def evict(self, n_tokens: int) -> EvictResult:
        """Evicts unlocked leaves in policy order until >= ``n_tokens`` are freed
        or nothing evictable is left. O(log n) per evicted leaf."""
        try:
            n_tokens = operator.index(n_tokens)
        except TypeError:
            raise ValueError(f"evict: n_tokens must be an int, got {n_tokens!r}") from None
        if n_tokens < 0:
            raise ValueError(f"evict: n_tokens must be >= 0, got {n_tokens}")
        evictable = self._evictable
        page = self.page_size
        values: list[Any] = []
        freed = 0
        while freed < n_tokens and evictable:
            node = evictable.pop(0)[2]
            node.evict_entry = None
            values.append(node.value)
            freed += len(node.key_bytes) // TOKEN_BYTES
            parent = node.parent
            del parent.children[first_page(node.key_bytes, page)]
            node.parent = None
            self._num_nodes -= 1
            if parent.parent is None:
                if not parent.children:
                    self._drop_root(parent)
            elif not parent.children and parent.lock_ref == 0:
                self._relist(parent)  # the parent is now an unlocked leaf
        self._evictable_size -= freed
        self._evicted_tokens += freed
        return EvictResult(freed, values)

    def set_priority(self, node: TreeNode, priority: float) -> None:
        """Sets ``node.priority`` (policy "priority": lower is evicted first)."""
        self._require_attached(node, "set_priority")
        listed = node.evict_entry is not None
        if listed:
            self._unlist(node)
        node.priority = priority
        if listed:
            self._relist(node)

    def reset(self) -> EvictResult:
        """Drops every node (a flush); counters are kept. Returns what was dropped."""
        if self._protected_size:
            raise RuntimeError(
                f"reset: {self._protected_size} tokens are locked; unlock every node first"
            )
        values: list[Any] = []
        dropped = 0
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.key_bytes:
                values.append(node.value)
                dropped += len(node.key_bytes) // TOKEN_BYTES
            # Detached nodes make a late lock()/unlock() fail loudly.
            node.children = {}
            node.parent = None
            node.evict_entry = None
        self._roots.clear()
        self._evictable.clear()
        self._evictable_size = 0
        self._num_nodes = 0
        logger.debug("radix tree reset: dropped %d tokens", dropped)
        return EvictResult(dropped, values)

    def stats(self) -> dict[str, Any]:
        queried = self._queried_tokens
        return {
            "queried_tokens": queried,
            "hit_tokens": self._hit_tokens,
            "hit_rate": self._hit_tokens / queried if queried else 0.0,
            "inserted_tokens": self._inserted_tokens,
            "evicted_tokens": self._evicted_tokens,
            "nodes": self._num_nodes,
            "evictable_leaves": len(self._evictable),
            "namespaces": len(self._roots),
            "evictable_size": self._evictable_size,
            "protected_size": self._protected_size,
            "total_size": self.total_size,
        }

    def check(self) -> None:
        """Raises RuntimeError naming the first broken invariant. O(n)."""
        from radixserve.radix_tree.check import check_tree

        check_tree(self)

    def root(self, namespace: Hashable = None) -> TreeNode | None:
        """The root of ``namespace``, or None while the namespace holds nothing."""
        return self._root(namespace)

    # ---------------------------------------------------------------- helpers

    def _descend(
        self,
        root: TreeNode,
        tokens: Sequence[int],
        raw: bytes | memoryview,
        end: int,
        now: float,
        hit: bool,
        priority: float | None,
    ) -> tuple[TreeNode, int, list[Any]]:
        """Walks the first ``end`` tokens (whole pages) from ``root`` as far as
        cached, splitting the last node on a partial match, and touches every
        node passed. Returns the last node, the matched length and the value
        pieces. The last node is left out of the evictable set: the caller
        re-files it."""
        p = self.page_size
        node = root
        pos = 0
        values: list[Any] = []
        while pos < end:
            child = node.children.get(tokens[pos] if p == 1 else tuple(tokens[pos : pos + p]))
            if child is None:
                break
            key_bytes = child.key_bytes
            n = len(key_bytes) // TOKEN_BYTES
            stop = pos + n if pos + n < end else end
            # One memcmp: the child's run against the key's next tokens (all of
            # the run, or what is left of the key when that is shorter).
            if key_bytes.startswith(raw[TOKEN_BYTES * pos : TOKEN_BYTES * stop]):
                common = stop - pos  # whole pages: pos, end and n are page multiples
            else:
                common = common_tokens(key_bytes, raw, TOKEN_BYTES * pos, stop - pos)
                common -= common % p  # >= p: the first pages agree
            if common < n:
                child = self._split(child, common)
                n = common
            # Only the last node of a path can be a leaf, so this runs at most once.
            if child.evict_entry is not None:
                self._unlist(child)
            child.last_access = now
            if hit:
                child.hit_count += 1
            if priority is not None and priority > child.priority:
                child.priority = priority
            values.append(child.value)
            pos += n
            node = child
        return node, pos, values

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Splits ``child`` after ``n`` tokens; returns the new upper node.

        The upper node copies lock_ref and the policy fields, so sizes, locks
        and the lock invariant (parent >= child) are unchanged, and a lock taken
        on ``child`` still covers both halves when it is released.
        """
        listed = child.evict_entry is not None
        if listed:  # a policy may rank by key length
            self._unlist(child)
        parent = child.parent
        assert parent is not None, "a root is never split"
        key_bytes = child.key_bytes
        cut = TOKEN_BYTES * n
        upper = TreeNode(
            self._new_id(), key_bytes[:cut], child.value[:n], parent, child.namespace,
            child.depth - len(key_bytes) // TOKEN_BYTES + n, child.created, child.priority,
        )
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.hit_count = child.hit_count
        # Both halves are copies (bytes slices), so no buffer outlives its tokens.
        child.key_bytes = key_bytes[cut:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[first_page(child.key_bytes, self.page_size)] = child
        # The upper half starts where the child did: same dict key in the parent.
        parent.children[first_page(key_bytes, self.page_size)] = upper
        self._num_nodes += 1
        if listed:
            self._relist(child)
        return upper

    def _relist(self, node: TreeNode) -> None:
        """Files ``node`` in the evictable set iff it is an unlocked attached leaf."""
        if node.evict_entry is not None:
            self._unlist(node)
        if node.lock_ref == 0 and not node.children and node.parent is not None:
            entry = (self._sort_key(node), node.id, node)
            node.evict_entry = entry
            self._evictable.add(entry)

    def _unlist(self, node: TreeNode) -> None:
        self._evictable.remove(node.evict_entry)
        node.evict_entry = None

    def _root(self, namespace: Hashable) -> TreeNode | None:
        try:
            return self._roots.get(namespace)
        except TypeError:
            raise ValueError(f"namespace must be hashable, got {namespace!r}") from None

    def _new_root(self, namespace: Hashable) -> TreeNode:
        root = TreeNode(self._new_id(), b"", None, None, namespace, 0, 0.0, 0.0)
        self._roots[namespace] = root
        return root

    def _drop_root(self, root: TreeNode) -> None:
        # An empty namespace must not leak its root.
        if self._roots.get(root.namespace) is root:
            del self._roots[root.namespace]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def _require_attached(node: TreeNode, op: str) -> None:
        if node.parent is None and node.key_bytes:
            raise RuntimeError(
                f"{op}: {node!r} is no longer in the tree (evicted or reset); match again"
            )
