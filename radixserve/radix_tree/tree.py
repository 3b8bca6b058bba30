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

Size accounting, kept by every operation and verified by ``check()``:

    evictable_size = tokens in attached non-root nodes with lock_ref == 0
    protected_size = tokens in attached non-root nodes with lock_ref  > 0
    evictable set  = exactly the attached non-root leaves with lock_ref == 0,
                     each filed under (policy key, node id)
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Hashable, Sequence

from sortedcontainers import SortedList

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


def _as_tokens(key: Sequence[int]) -> tuple:
    if isinstance(key, tuple):
        return key
    tolist = getattr(key, "tolist", None)  # numpy arrays, torch tensors
    return tuple(tolist() if tolist is not None else key)


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
        tokens = _as_tokens(key)
        self._queried_tokens += len(tokens)
        tokens = self._whole_pages(tokens)
        root = self._root(namespace, create=False)
        if root is None or not tokens:
            if root is None:  # a stand-in, so that m.node.depth == 0 and lock is a no-op
                root = TreeNode(-1, (), None, None, namespace, 0, 0.0, 0.0)
            return MatchResult(0, [], root)
        node, length, values = self._descend(root, tokens, self._clock(), True, None)
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
        tokens = _as_tokens(key)
        if len(value) != len(tokens):
            raise ValueError(
                f"insert: len(value) must equal len(key), got {len(value)} != {len(tokens)}"
            )
        tokens = self._whole_pages(tokens)
        end = len(tokens)
        root = self._root(namespace, create=end > 0)
        if end == 0:
            return 0
        now = self._clock()
        node, present, _ = self._descend(root, tokens, now, False, priority)
        if present < end:
            # The new leaf's first page differs from every child of ``node``,
            # else _descend would have gone on; ``node`` stops being a leaf.
            leaf = TreeNode(
                self._new_id(), tokens[present:], value[present:end], node,
                namespace, node.depth + end - present, now, priority,
            )
            node.children[self._first_page(leaf.key)] = leaf
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
                moved += len(node.key)
            node.lock_ref += 1
            node = node.parent
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
                moved += len(node.key)
                self._relist(node)
            node = node.parent
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
        values: list[Any] = []
        freed = 0
        while freed < n_tokens and evictable:
            node = evictable.pop(0)[2]
            node.evict_entry = None
            values.append(node.value)
            freed += len(node.key)
            parent = node.parent
            del parent.children[self._first_page(node.key)]
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
            if node.key:
                values.append(node.value)
                dropped += len(node.key)
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
        return self._root(namespace, create=False)

    # ---------------------------------------------------------------- helpers

    def _descend(
        self,
        root: TreeNode,
        tokens: tuple,
        now: float,
        hit: bool,
        priority: float | None,
    ) -> tuple[TreeNode, int, list[Any]]:
        """Walks ``tokens`` from ``root`` as far as cached, splitting the last
        node on a partial match, and touches every node passed. Returns the
        last node, the matched length and the value pieces. The last node is
        left out of the evictable set: the caller re-files it."""
        p = self.page_size
        end = len(tokens)
        node = root
        pos = 0
        values: list[Any] = []
        while pos < end:
            child = node.children.get(tokens[pos] if p == 1 else tokens[pos : pos + p])
            if child is None:
                break
            n = len(child.key)
            if tokens[pos : pos + n] != child.key:
                child = self._split(child, self._common_length(child.key, tokens, pos))
                n = len(child.key)
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

    def _common_length(self, node_key: tuple, tokens: tuple, pos: int) -> int:
        """Shared leading tokens of ``node_key`` and ``tokens[pos:]``, rounded
        down to whole pages. At least one page, since the first pages agree."""
        p = self.page_size
        limit = min(len(node_key), len(tokens) - pos)
        i = p
        while i < limit and node_key[i] == tokens[pos + i]:
            i += 1
        return i - i % p

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
        upper = TreeNode(
            self._new_id(), child.key[:n], child.value[:n], parent, child.namespace,
            child.depth - len(child.key) + n, child.created, child.priority,
        )
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.hit_count = child.hit_count
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._first_page(child.key)] = child
        parent.children[self._first_page(upper.key)] = upper
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

    def _first_page(self, key: tuple) -> Any:
        return key[0] if self.page_size == 1 else key[: self.page_size]

    def _whole_pages(self, tokens: tuple) -> tuple:
        extra = len(tokens) % self.page_size
        return tokens[: len(tokens) - extra] if extra else tokens

    def _root(self, namespace: Hashable, create: bool) -> TreeNode | None:
        try:
            root = self._roots.get(namespace)
        except TypeError:
            raise ValueError(f"namespace must be hashable, got {namespace!r}") from None
        if root is None and create:
            root = TreeNode(self._new_id(), (), None, None, namespace, 0, 0.0, 0.0)
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
        if node.parent is None and node.key:
            raise RuntimeError(
                f"{op}: {node!r} is no longer in the tree (evicted or reset); match again"
            )
