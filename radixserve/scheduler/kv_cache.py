"""KV slot bookkeeping between the radix tree, the allocator and running requests.

Invariant kept here (checked by `check`):

    allocator.num_free + tree.total_size + sum(private tails) == allocator.num_slots

A slot moves free -> private when a step allocates it, private -> tree on
`commit`, tree -> free on eviction, and private -> free when a duplicate loses
to the tree's own copy on insert.

With the prefix cache off the tree is still where computed tokens go (so
slots shared inside a batch have one owner), but admission matches nothing,
whatever no running request has locked is evicted as soon as a request ends,
and no request shares a slot with another that it was not folded with: each
request files its tokens under a namespace of its own (its "family"), which
the sequences folded together in a batch share (`share_family`). Otherwise a
commit would re-point a request at a concurrent duplicate's slots, and the
cache-off engine would share K/V across requests after all.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterable, Sequence
from itertools import count

from radixserve.model_runner.kv_pool import ReqToTokenPool, SlotAllocator
from radixserve.radix_tree import RadixTree
from radixserve.scheduler.request import Req, token_array


def _flatten(pieces: Sequence[Sequence[int]]) -> array:
    """The tree's value pieces (slot arrays) as one array."""
    out = token_array()
    for piece in pieces:
        out.extend(piece)  # one copy per piece
    return out


class KVCacheManager:
    def __init__(
        self,
        tree: RadixTree,
        allocator: SlotAllocator,
        req_to_token: ReqToTokenPool,
        *,
        enable_prefix_cache: bool,
    ) -> None:
        self.tree = tree
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.enable_prefix_cache = enable_prefix_cache
        # Table writes of this step, applied together by `sync_table` before the forward.
        self._table_writes: list[tuple[int, int, Sequence[int]]] = []
        # Admission-time counters (the tree's own also count internal re-matches).
        self.queried_tokens = 0
        self.hit_tokens = 0
        self._families = count()  # cache off: one tree namespace per request or fold family

    @property
    def capacity(self) -> int:
        return self.allocator.num_slots

    def available(self) -> int:
        """Slots a step could get: free ones plus what eviction can free."""
        return self.allocator.num_free + self.tree.evictable_size

    # -- a request's KV over its life ------------------------------------------------

    def admit(self, req: Req) -> bool:
        """Match the request's tokens in the tree, lock the match, and give it a table row.

        At least one token is always left to compute: its logits are what the
        step samples from. Returns False (holding nothing) when no row is free.
        """
        row = self.req_to_token.alloc()
        if row is None:
            return False
        req.row = row
        fill = req.fill_ids
        if self.enable_prefix_cache:
            req.tree_namespace = req.namespace
            m = self.tree.match_prefix(fill[: req.match_limit], namespace=req.namespace)
            self.tree.lock(m.node)
            req.last_node = m.node
            req.slots = _flatten(m.values)
            req.cache_len = req.kv_len = m.length
            self._table_writes.append((row, 0, req.slots))
        else:
            req.tree_namespace = (req.namespace, next(self._families))
            req.slots = token_array()
            req.cache_len = req.kv_len = 0
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = min(req.kv_len, len(req.prompt_ids))
            self.queried_tokens += len(req.prompt_ids)
            self.hit_tokens += req.cached_tokens
        return True

    def share_family(self, reqs: Sequence[Req]) -> None:
        """Fresh requests folded together in one batch (tree mode) file their tokens under
        one namespace, so the slots they share have one owner. Nothing to do with the cache
        on: every request of a namespace shares the tree there."""
        if self.enable_prefix_cache or len(reqs) < 2:
            return
        family: Hashable = reqs[0].tree_namespace
        for req in reqs[1:]:
            if req.cache_len or req.kv_len:
                raise RuntimeError(f"{req} joins a fold family after computing tokens")
            req.tree_namespace = family

    def undo_admit(self, req: Req) -> None:
        """Give back what `admit` took (the request did not fit after all)."""
        if req.kv_len != req.cache_len:
            raise RuntimeError(f"undo_admit after {req} computed tokens")
        self._unlock(req)
        self._drop_row(req)
        req.slots = token_array()
        req.kv_len = req.cache_len = 0

    def alloc(self, n: int) -> array | None:
        """Take n free slots, evicting unlocked tree leaves if needed; None if impossible."""
        short = n - self.allocator.num_free
        if short > 0:
            self._evict(short)
        return self.allocator.alloc(n)

    def _evict(self, n: int) -> None:
        evicted = self.tree.evict(n)
        if evicted.values:
            self.allocator.free(_flatten(evicted.values))

    def extend(self, req: Req, slots: Sequence[int]) -> None:
        """The request's next tokens will be written to `slots` (private until committed)."""
        self._table_writes.append((req.table_row, len(req.slots), slots))
        req.slots.extend(slots)

    def commit(self, req: Req) -> None:
        """Insert the request's computed tokens into the tree and move its lock there."""
        m, canonical = self._insert(req)
        self.tree.lock(m.node)
        self._unlock(req)
        if m.length > req.cache_len:
            self._table_writes.append((req.table_row, req.cache_len, canonical[req.cache_len :]))
        req.slots = canonical + req.slots[m.length :]
        req.cache_len = m.length
        req.last_node = m.node

    def release(self, req: Req) -> None:
        """The request stops running (finished, aborted or retracted): hand its KV over.

        Everything computed goes to the tree (multi-turn reuse; a retracted
        request's retry is cheap); what the tree cannot hold (a partial page)
        is freed. With the cache off, what no running request has locked is
        evicted at once.
        """
        m, _ = self._insert(req)
        self._unlock(req)
        self.allocator.free(req.slots[m.length :])
        req.slots = token_array()
        req.kv_len = req.cache_len = 0
        self._drop_row(req)
        if not self.enable_prefix_cache:
            self._evict(self.tree.evictable_size)

    def discard(self, reqs: Sequence[Req]) -> None:
        """Drop the KV state of `reqs` and insert nothing (recovery from a failed step).

        The newest K/V of a failed step's requests may never have been written, so none of
        their private tails may reach the tree: each tail slot goes back to the free list
        once (a borrowed slot sits in its donor's tail too; a slot already free stays so).
        Their rows and locks are given back. What the tree holds was committed by steps
        that ran, and stays. `reqs` must be every request holding KV state: afterwards the
        pool must add up with no holder, or RuntimeError (bookkeeping beyond repair).
        """
        tails: set[int] = set()
        for req in reqs:
            tails.update(req.slots[req.cache_len :])
            self._unlock(req)
            self._drop_row(req)
            req.slots = token_array()
            req.kv_len = req.cache_len = req.borrowed_len = 0
        self._table_writes = []
        free = self.allocator.free_ids()
        tails.difference_update(free)
        self.allocator.free(sorted(tails, reverse=True))
        if not self.enable_prefix_cache:
            self._evict(self.tree.evictable_size)
        if self.tree.protected_size or len(set(free)) != len(free):
            raise RuntimeError(
                f"KV bookkeeping is inconsistent after a failed step: {self.tree.protected_size} "
                "tokens still locked, or a slot freed twice"
            )
        if self.allocator.num_free + self.tree.total_size != self.capacity:
            raise RuntimeError(
                f"KV bookkeeping is inconsistent after a failed step: free {self.allocator.num_free} "
                f"+ tree {self.tree.total_size} != capacity {self.capacity}"
            )
        if self.req_to_token.num_free != self.req_to_token.max_requests:
            raise RuntimeError("KV bookkeeping is inconsistent after a failed step: table rows still held")

    def _insert(self, req: Req) -> tuple:
        """Insert `fill_ids[:kv_len]`; return the tree's copy of the path and its slots.

        Where the tree already held a token under another slot, the request's
        copy is a duplicate and is freed, but only a slot the request owns:
        `slots[cache_len:borrowed_len]` belong to the same-batch donor they
        were folded onto (tree fold mode), which frees its own. A slot the tree
        now holds under the same id is shared, not duplicated, so inserting
        donors and borrowers in any order frees each slot exactly once.
        """
        n = req.kv_len
        key = req.fill_ids[:n]
        self.tree.insert(key, req.slots[:n], namespace=req.tree_namespace)
        m = self.tree.match_prefix(key, namespace=req.tree_namespace)
        canonical = _flatten(m.values)
        start = max(req.cache_len, req.borrowed_len)
        if m.length > start:
            dup = [a for a, b in zip(req.slots[start : m.length], canonical[start:]) if a != b]
            self.allocator.free(dup)
        req.borrowed_len = 0
        return m, canonical

    def sync_table(self) -> None:
        """Apply the step's pending req_to_token writes in one go.

        Runs after scheduling, before the forward pass reads the table. A
        commit's re-pointing to the tree's slots (after freeing duplicates)
        waits here too: nothing reads the table in between.
        """
        writes, self._table_writes = self._table_writes, []
        self.req_to_token.write_many(writes)

    def _unlock(self, req: Req) -> None:
        if req.last_node is not None:
            self.tree.unlock(req.last_node)
            req.last_node = None

    def _drop_row(self, req: Req) -> None:
        if req.row is not None:
            # Pending writes to a freed row are moot, and must go: the row may be
            # reused this step, and one indexed write applies duplicates in no set order.
            self._table_writes = [w for w in self._table_writes if w[0] != req.row]
            self.req_to_token.free(req.row)
            req.row = None

    # -- whole-cache operations ------------------------------------------------------

    def flush(self) -> bool:
        """Drop every cached prefix; refused (False) while any is locked by a running request."""
        if self.tree.protected_size > 0:
            return False
        dropped = self.tree.reset()
        if dropped.values:
            self.allocator.free(_flatten(dropped.values))
        return True

    def private_tokens(self, reqs: Iterable[Req]) -> int:
        return sum(len(r.slots) - r.cache_len for r in reqs)

    def check(self, holders: Iterable[Req]) -> None:
        """Every slot is free, in the tree, or in exactly one request's private tail."""
        holders = list(holders)
        private = self.private_tokens(holders)
        free = self.allocator.num_free
        tree = self.tree.total_size
        if free + tree + private != self.capacity:
            raise RuntimeError(
                f"slot leak: free {free} + tree {tree} + private {private} != capacity {self.capacity}"
            )
        owned = list(self.allocator.free_ids())
        for r in holders:
            owned += r.slots[r.cache_len :]
        if len(owned) != len(set(owned)):
            raise RuntimeError("a slot is owned twice (free list / private tails overlap)")
        self.tree.check()
