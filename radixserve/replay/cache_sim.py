"""CacheSim: one prefix cache (the engine's RadixTree) of one policy and capacity.

Each request does what the engine does with a prompt, in trace order:

    match the key -> lock the matched node -> evict until the unmatched part fits
    -> insert the whole key -> unlock

so the matched prefix is never evicted to make room for its own request, and
eviction is lazy: the cache holds up to ``capacity`` tokens when the next
request is matched. A prompt larger than the whole capacity is not cached and
evicts nothing (``uncacheable``): an engine could not hold it either, and
caching a part of it would split a block, which the block model cannot.

Capacity, hits and evictions are counted in tokens through KeyWeights; the
tree counts key elements. ``used`` is kept equal to the tokens the tree holds
(``check`` verifies it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from radixserve.radix_tree import RadixTree, TreeNode
from radixserve.radix_tree.policies import POLICIES
from radixserve.replay.formats import TraceRequest
from radixserve.replay.keys import POS_BITS, POS_MASK, KeyWeights, handles

ONLINE_POLICIES = tuple(POLICIES)  # the radix tree's own


class StepResult(NamedTuple):
    hit_tokens: int
    same_session_tokens: int  # hit tokens first cached by a request of the same session
    uncacheable: bool  # larger than the capacity, so not cached


class CacheSim:
    """A prefix cache of ``capacity`` tokens (None: unlimited) under ``policy``."""

    def __init__(self, policy: str, capacity: int | None, check: bool = False, compute_last: bool = False) -> None:
        if policy not in ONLINE_POLICIES:
            raise ValueError(f"policy must be one of {ONLINE_POLICIES}, got {policy!r}")
        self._init(policy, capacity, check, compute_last)

    def _init(self, policy: str, capacity: int | None, check: bool, compute_last: bool) -> None:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
        self.policy = policy
        self.capacity = capacity
        self.tree = RadixTree(page_size=1, policy="priority" if policy == "belady" else policy)
        self.check_each_step = check
        # Count hits as the engine does: the last prompt token is always computed,
        # since its logits are sampled from. The tree itself is unaffected.
        self.compute_last = compute_last
        self.block_size = 1  # the trace's block size, from the first request
        self.used = 0  # tokens in the tree
        self.peak = 0
        self.evicted_tokens = 0
        self.inserted_tokens = 0
        self.uncacheable = 0
        # Creator records of requests with elements in the tree; bounded by the capacity.
        self.creators: dict[int, KeyWeights] = {}

    # ------------------------------------------------------------------ requests

    def step(self, req: TraceRequest, key: tuple[int, ...], weights: KeyWeights) -> StepResult:
        """Serve one request: count its hit, then cache its key."""
        tree = self.tree
        self.block_size = weights.block_size
        m = tree.match_prefix(key)
        hit = m.length
        hit_tokens = weights.span(0, hit)
        same = self._same_session(m.values, req.session) if req.session is not None and hit else 0
        counted = min(hit_tokens, req.input_length - 1) if self.compute_last else hit_tokens
        end = len(key)
        uncacheable = False
        if hit < end:
            new_tokens = weights.span(hit, end)
            if self.capacity is not None and hit_tokens + new_tokens > self.capacity:
                # Bigger than the whole cache: an engine could not hold it either.
                uncacheable = True
                end = hit
            elif self.capacity is not None and self.used + new_tokens > self.capacity:
                tree.lock(m.node)
                self._evict(self.used + new_tokens - self.capacity)
                tree.unlock(m.node)  # nothing else runs before the insert below
        if end > hit:
            present = tree.insert(key[:end], handles(req, end), priority=self._insert_priority(req))
            if present != hit:
                raise RuntimeError(f"insert found {present} tokens present after a match of {hit}")
            weights.refs += end - hit
            self.creators[req.index] = weights
            added = weights.span(hit, end)
            self.used += added
            self.inserted_tokens += added
            self.peak = max(self.peak, self.used)
        self._after_insert(req, key, m, end)
        self.uncacheable += uncacheable
        if self.check_each_step:
            self.check()
        return StepResult(counted, min(same, counted), uncacheable)

    def _insert_priority(self, req: TraceRequest) -> float:
        return req.priority  # read by policy "priority" only

    def _after_insert(self, req: TraceRequest, key: tuple[int, ...], m: Any, end: int) -> None:
        """Hook for policies that re-rank the request's path (Belady)."""

    def _same_session(self, pieces: list[range], session: str) -> int:
        same = 0
        for piece in pieces:
            creator = self.creators[piece[0] >> POS_BITS]
            if creator.session == session:
                a = piece[0] & POS_MASK
                same += creator.span(a, a + len(piece))
        return same

    # ------------------------------------------------------------------ eviction

    def _evict(self, need: int) -> None:
        """Evicts leaves in policy order until ``need`` tokens are freed or none is left.

        Exactly a token-level ``evict(need)``: a call for ceil(rest / B)
        elements never passes the leaf where the token count reaches ``need``
        (every element weighs <= B tokens), and stops early only when partial
        blocks fall short, in which case the loop asks again.
        """
        block = self.block_size
        freed = 0
        while freed < need:
            r = self.tree.evict(-(-(need - freed) // block))
            if not r.num_tokens:
                break
            for piece in r.values:
                freed += self._release(piece, len(piece))
        self.used -= freed
        self.evicted_tokens += freed

    def _release(self, piece: range, n: int) -> int:
        """Forgets the last ``n`` elements of an evicted ``piece``; returns their tokens."""
        c = piece[0] >> POS_BITS
        creator = self.creators[c]
        b = (piece[-1] & POS_MASK) + 1
        tokens = creator.span(b - n, b)
        creator.refs -= n
        if creator.refs == 0:
            del self.creators[c]
        return tokens

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Raises RuntimeError if the tree or the token accounting is inconsistent."""
        self.tree.check()
        total = 0
        refs: dict[int, int] = {}
        root = self.tree.root()
        stack: list[TreeNode] = list(root.children.values()) if root is not None else []
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            c = node.value[0] >> POS_BITS
            a = node.value[0] & POS_MASK
            if (node.value[-1] & POS_MASK) + 1 != node.depth:
                raise RuntimeError(
                    f"node {node.id} ends at depth {node.depth} but its handles at {a + len(node.value)}"
                )
            total += self.creators[c].span(a, a + len(node.value))
            refs[c] = refs.get(c, 0) + len(node.value)
        if total != self.used:
            raise RuntimeError(f"the tree holds {total} tokens but the simulation counts {self.used}")
        if self.capacity is not None and self.used > self.capacity:
            raise RuntimeError(f"{self.used} tokens cached over the capacity {self.capacity}")
        bad = {c: (w.refs, refs.get(c, 0)) for c, w in self.creators.items() if w.refs != refs.get(c, 0)}
        if bad:
            raise RuntimeError(f"creator element counts (kept, in tree) disagree: {dict(list(bad.items())[:3])}")
