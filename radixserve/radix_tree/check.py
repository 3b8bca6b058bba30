"""check_tree: recomputes everything the RadixTree keeps incrementally and
raises RuntimeError naming the first invariant that does not hold."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from radixserve.radix_tree.keys import TOKEN_BYTES, first_page

if TYPE_CHECKING:
    from radixserve.radix_tree.node import TreeNode
    from radixserve.radix_tree.tree import RadixTree


def _fail(invariant: str, detail: str) -> NoReturn:
    raise RuntimeError(f"radix tree invariant '{invariant}' broken: {detail}")


def _check_root(namespace: object, root: TreeNode) -> None:
    if root.key_bytes or root.parent is not None or root.depth != 0:
        _fail("root shape", f"root of namespace {namespace!r} has a key, parent or depth")
    if root.namespace != namespace:
        _fail("namespace", f"root filed under {namespace!r} has namespace {root.namespace!r}")
    if root.lock_ref != 0 or root.evict_entry is not None:
        _fail("root never locked or evictable", f"root of namespace {namespace!r}")
    if not root.children:
        _fail("no empty roots", f"namespace {namespace!r} has a root without children")


def _check_node(tree: RadixTree, parent: TreeNode, first: object, node: TreeNode) -> None:
    p = tree.page_size
    if node.parent is not parent:
        _fail("parent/child links", f"{node!r} is a child of {parent!r} but names another parent")
    key_bytes = node.key_bytes
    if type(key_bytes) is not bytes or len(key_bytes) % TOKEN_BYTES:
        _fail("keys are int64 bytes", f"{node!r} holds a {type(key_bytes).__name__} key")
    n = len(key_bytes) // TOKEN_BYTES
    if not n:
        _fail("non-empty keys", f"{node!r} below the root has an empty key")
    if first != first_page(key_bytes, p):
        _fail("child key == first token/page", f"{node!r} filed under {first!r}")
    if len(node.value) != n:
        _fail("len(value) == len(key)", f"{node!r} holds {len(node.value)} values")
    if n % p:
        _fail("page alignment", f"{node!r} has {n} tokens, page_size {p}")
    if node.depth != parent.depth + n:
        _fail("depth", f"{node!r} depth != parent depth {parent.depth} + {n}")
    if node.namespace != parent.namespace:
        _fail("namespace", f"{node!r} under a node of namespace {parent.namespace!r}")
    if node.lock_ref < 0:
        _fail("lock_ref >= 0", f"{node!r}")
    if parent.parent is not None and parent.lock_ref < node.lock_ref:
        _fail("parent lock_ref >= child lock_ref", f"{parent!r} above {node!r}")
    entry = node.evict_entry
    if node.lock_ref == 0 and not node.children:
        if entry is None or entry not in tree._evictable:
            _fail("evictable set == unlocked leaves", f"unlocked leaf {node!r} is not in the set")
        if entry[0] != tree._sort_key(node) or entry[1] != node.id:
            _fail("evictable set keys current", f"{node!r} filed under a stale key {entry[:2]}")
    elif entry is not None:
        _fail("evictable set == unlocked leaves", f"locked or inner node {node!r} is in the set")


def check_tree(tree: RadixTree) -> None:
    evictable = protected = nodes = leaves = 0
    seen: set[int] = set()
    for namespace, root in tree._roots.items():
        _check_root(namespace, root)
        stack = [root]
        while stack:
            parent = stack.pop()
            for first, node in parent.children.items():
                if id(node) in seen:
                    _fail("tree shape", f"{node!r} is reached twice")
                seen.add(id(node))
                _check_node(tree, parent, first, node)
                stack.append(node)
                nodes += 1
                if node.lock_ref:
                    protected += node.num_tokens
                else:
                    evictable += node.num_tokens
                    leaves += not node.children
    if len(tree._evictable) != leaves:
        _fail("evictable set == unlocked leaves",
              f"set holds {len(tree._evictable)} entries, tree has {leaves} unlocked leaves")
    if tree.evictable_size != evictable:
        _fail("evictable_size", f"counter {tree.evictable_size} != recomputed {evictable}")
    if tree.protected_size != protected:
        _fail("protected_size", f"counter {tree.protected_size} != recomputed {protected}")
    if tree.total_size != evictable + protected:
        _fail("total_size", f"{tree.total_size} != {evictable} + {protected}")
    if tree.num_nodes != nodes:
        _fail("node count", f"counter {tree.num_nodes} != recomputed {nodes}")
    stats = tree.stats()
    if not 0 <= stats["hit_tokens"] <= stats["queried_tokens"]:
        _fail("hit_tokens <= queried_tokens", f"{stats['hit_tokens']} > {stats['queried_tokens']}")
    if min(stats["inserted_tokens"], stats["evicted_tokens"]) < 0:
        _fail("counters >= 0", f"{stats}")
