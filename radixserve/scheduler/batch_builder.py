"""From the scheduler's plan (which requests compute how many tokens) to a ForwardBatch.

This is where within-batch folding happens. The sequences that can share
work are prefill chunks with no private tail: their computed context is a
radix node, and the fold trie is rooted there, so two of them fold only if
their whole paths agree. Fold modes:

- `off`: every planned token is a row of the forward pass.
- `mlp`: the model runs on compact rows (one per unique path); q/k/v are
  unfolded for attention, which runs per sequence as without folding, and
  its output is folded back. Every sequence still writes its own K/V.
- `tree`: each compact row's K/V is written once; a later sequence's slot list
  points at the donor's slots (`Req.borrowed_len`), so it attends as if those
  tokens were a cached prefix and only its own rows run attention. A sequence
  wholly contained in another computes nothing; its outputs are read from the
  donor's rows (causal attention makes them equal).

All output rows (logits, hidden states, scored tokens) are indices into the
rows the forward pass computes.

Cascade (`plan_cascade`): consecutive sequences of a batch whose slot lists
start with the same computed slots (a cached prefix, or slots borrowed from a
donor) form a group whose shared prefix attention reads once
(attention/cascade.py). The `prefix` batch order puts such requests side by
side.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

import numpy as np
import torch

from radixserve.model_runner.forward_batch import CascadePlan, ForwardBatch
from radixserve.sampling_params import widest
from radixserve.scheduler.fold_plan import FoldPlan, build_fold_plan
from radixserve.scheduler.kv_cache import KVCacheManager
from radixserve.scheduler.request import Req

# A cascade costs a second attention pass and a merge per layer; a batch uses one only
# when the K/V reads it saves are at least this share of what the batch reads without it.
CASCADE_MIN_SAVED_SHARE = 0.125


class ScheduledBatch(NamedTuple):
    forward: ForwardBatch
    reqs: list[Req]  # in plan order
    extend_lens: list[int]  # tokens each request advances by
    sample_reqs: list[Req]  # requests whose last token's logits are sampled, in logits_rows order
    hidden_spans: dict[int, tuple[int, int]]  # id(req) -> span of forward.hidden_rows (embeddings)
    score_spans: dict[int, tuple[int, int]]  # id(req) -> span of forward.score_rows
    folded: list[int]  # per request: tokens served by another sequence's rows this step
    fold_ratio: float  # computed rows / planned tokens
    commits: list[Req]  # prefill chunks to insert into the tree (emptied once inserted)
    # ids of the requests whose input token the previous step sampled and the host has not
    # seen yet (overlapped scheduling): it is read on the device (ForwardBatch.sourced).
    ahead: frozenset[int] = frozenset()

    @property
    def is_plain_decode(self) -> bool:
        """Every request decodes one token and only samples it: no prefill chunk to commit,
        nothing folded, pooled or scored (what overlapped scheduling can run ahead of)."""
        return (
            bool(self.sample_reqs)
            and len(self.sample_reqs) == len(self.reqs)
            and not self.commits
            and not any(self.folded)
            and all(n == 1 for n in self.extend_lens)
        )


def fold_key(req: Req, n: int) -> tuple[str, object]:
    """Sequences with equal keys may fold: same radix node, nothing private after it."""
    prefill = n > 1 or req.kv_len < len(req.prompt_ids)
    if not prefill or req.kv_len != req.cache_len:
        return ("own", id(req))
    if req.cache_len == 0:
        return ("root", req.namespace)
    return ("node", id(req.last_node))


class SharedSlots:
    """`shared_slots` results by request: (neighbour's slot list, own slot list, shared length),
    valid while both lists are the same objects. The scheduler forgets a request that ends."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[array, array, int]] = {}

    def get(self, req: Req, a: array, b: array) -> int | None:
        memo = self._memo.get(id(req))
        return memo[2] if memo is not None and memo[0] is a and memo[1] is b else None

    def put(self, req: Req, a: array, b: array, n: int) -> None:
        self._memo[id(req)] = (a, b, n)

    def forget(self, req: Req) -> None:
        self._memo.pop(id(req), None)


def build_batch(
    plan: list[tuple[Req, int]],
    cache: KVCacheManager,
    fold_mode: str,
    fold_threshold: float,
    cascade_min_prefix: int = 0,
    sourced: dict[int, int] | None = None,
    memo: SharedSlots | None = None,
) -> ScheduledBatch:
    """Allocate the step's KV slots and lay out the forward pass (folded or not); with
    `cascade_min_prefix` > 0, plan a cascade over prefixes shared by at least that many slots.

    `sourced` (overlapped scheduling) maps id(req) to its row of the previous step's sampled
    tokens, for each request decoding the token that step sampled: not on the host yet, so
    its input id is that row (ForwardBatch.sourced)."""
    sourced = sourced or {}
    tokens = [
        np.array(req.fill_ids[req.kv_len : req.kv_len + n], dtype=np.int64) if id(req) not in sourced
        else np.array([sourced[id(req)]], dtype=np.int64)
        for req, n in plan
    ]
    positions = [np.arange(req.kv_len, req.kv_len + n, dtype=np.int64) for req, n in plan]
    fold: FoldPlan | None = None
    keys = [fold_key(r, n) for r, n in plan] if fold_mode != "off" else []
    # Only sequences without a private tail can share rows; a step of decodes has none.
    if sum(1 for k in keys if k[0] != "own") > 1:
        fold = build_fold_plan(tokens, positions, keys)
        if fold.num_rows == fold.num_tokens or fold.fold_ratio >= fold_threshold:
            fold = None
    if fold is not None and fold_mode == "tree":
        _share_families(plan, keys, cache)
        forward, row_of = _layout_tree(plan, fold, cache)
    else:
        forward, row_of = _layout_full(plan, tokens, positions, fold, cache)
    reqs = [r for r, _ in plan]
    if cascade_min_prefix > 0:
        by_row = {r.row: r for r in reqs}  # the forward's sequences (tree folding drops some)
        forward.cascade = plan_cascade(
            [by_row[row] for row in forward.req_rows], forward.prefix_lens, forward.seq_lens, cascade_min_prefix,
            memo or SharedSlots(),
        )
    extend_lens = [n for _, n in plan]
    folded = fold.folded_tokens.tolist() if fold is not None else [0] * len(plan)
    ratio = fold.fold_ratio if fold is not None else 1.0
    commits = [req for req, n in plan if n > 1 or req.kv_len < len(req.prompt_ids)]
    ahead = frozenset(sourced)
    batch = ScheduledBatch(forward, reqs, extend_lens, [], {}, {}, folded, ratio, commits, ahead)
    if ahead:
        cu = _seq_offsets(plan)
        where = [int(cu[i]) for i, (req, _) in enumerate(plan) if id(req) in ahead]
        forward.sourced = torch.from_numpy(row_of[where].astype(np.int64))
    _output_rows(batch, row_of)
    for req, n in plan:  # the batch's K/V is written before any later step reads it
        req.kv_len += n
    return batch


def build_decode_ahead(
    reqs: list[Req], rows: list[int], cache: KVCacheManager, cascade_min_prefix: int = 0,
    memo: SharedSlots | None = None,
) -> ScheduledBatch:
    """One more token for each of `reqs` whose input token is still on the device: row
    `rows[i]` of the previous step's sampled tokens (an overlapped decode step)."""
    slots = _alloc(cache, len(reqs))
    positions = []
    for req, slot in zip(reqs, slots):
        cache.extend(req, [slot])
        positions.append(req.kv_len)
        req.kv_len += 1
    n = len(reqs)
    # One conversion for the three columns: torch.tensor reads a list element by element.
    input_ids, token_positions, out_slots = torch.from_numpy(np.array([rows, positions, slots], dtype=np.int64))
    forward = ForwardBatch(
        input_ids=input_ids,
        positions=token_positions,
        out_slots=out_slots,
        req_rows=[r.table_row for r in reqs],
        prefix_lens=positions,
        extend_lens=[1] * n,
        logits_rows=torch.arange(n, dtype=torch.int64),
        sourced=torch.arange(n, dtype=torch.int64),
    )
    if cascade_min_prefix > 0:
        forward.cascade = plan_cascade(reqs, positions, [p + 1 for p in positions], cascade_min_prefix,
                                       memo or SharedSlots())
    ahead = frozenset(map(id, reqs))
    return ScheduledBatch(forward, list(reqs), [1] * n, list(reqs), {}, {}, [0] * n, 1.0, [], ahead)


def plan_cascade(
    reqs: list[Req], prefix_lens: list[int], seq_lens: list[int], min_prefix: int, memo: SharedSlots
) -> CascadePlan | None:
    """Group consecutive sequences sharing at least `min_prefix` computed slots; None when no
    group forms or the K/V reads saved are too small a share to pay for the second pass.

    A group's prefix is the shortest shared length between neighbours inside it, and never
    reaches a member's tokens of this batch (`prefix_lens`)."""
    if not reqs:
        return None
    runs = [
        min(shared_slots(prev, req, memo), prefix_len, prev_len)
        for prev, req, prev_len, prefix_len in zip(reqs, reqs[1:], prefix_lens, prefix_lens[1:])
    ]
    plan = CascadePlan.from_runs(runs, min_prefix)
    saved = sum((n - 1) * p for n, p in zip(plan.group_sizes, plan.prefix_lens))
    if saved == 0 or saved < CASCADE_MIN_SAVED_SHARE * sum(seq_lens):
        return None
    return plan


def shared_slots(prev: Req, req: Req, memo: SharedSlots) -> int:
    """How many leading slots `req`'s list shares with `prev`'s.

    Sharing is prefix-closed (a slot reaches two lists only from a radix node path or a
    donor's prefix, both whole prefixes), so a binary search finds the first difference;
    a full comparison confirms it the first time. The result holds while both lists are
    the same objects (a commit that re-points slots at the tree replaces the list) and
    has found a difference (appending never extends a shared prefix then)."""
    a, b = prev.slots, req.slots
    known = memo.get(req, a, b)
    if known is not None:
        return known
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    lo, hi = 1, n  # a[:lo] == b[:lo]; the first difference is at or before hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    if a[:lo] != b[:lo]:  # not prefix-closed after all: share nothing rather than guess
        lo = 0
    if lo < n:
        memo.put(req, a, b, lo)
    return lo


def _share_families(plan: list[tuple[Req, int]], keys: list[tuple[str, object]], cache: KVCacheManager) -> None:
    """Fresh sequences of one fold root may borrow each other's slots: one family each
    (cache off). Those at a radix node are in the node's family already."""
    roots: dict[object, list[Req]] = {}
    for (req, _), key in zip(plan, keys):
        if key[0] == "root":
            roots.setdefault(key, []).append(req)
    for members in roots.values():
        cache.share_family(members)


def _seq_offsets(plan: list[tuple[Req, int]]) -> np.ndarray:
    cu = np.zeros(len(plan) + 1, dtype=np.int64)
    np.cumsum([n for _, n in plan], out=cu[1:])
    return cu


def _alloc(cache: KVCacheManager, n: int) -> array:
    """All of a step's new slots in one allocation (one eviction pass if short)."""
    slots = cache.alloc(n)
    if slots is None:  # admission and retraction guarantee room
        raise RuntimeError(f"KV pool exhausted while scheduling {n} tokens")
    return slots


def _layout_full(
    plan: list[tuple[Req, int]],
    tokens: list[np.ndarray],
    positions: list[np.ndarray],
    fold: FoldPlan | None,
    cache: KVCacheManager,
) -> tuple[ForwardBatch, np.ndarray]:
    """Off and mlp: every sequence gets its own slots for all its planned tokens."""
    slots = _alloc(cache, sum(n for _, n in plan))
    offset = 0
    for req, n in plan:
        cache.extend(req, slots[offset : offset + n])
        offset += n
    full_ids = torch.from_numpy(np.concatenate(tokens))
    full_pos = torch.from_numpy(np.concatenate(positions))
    forward = ForwardBatch(
        input_ids=full_ids,
        positions=full_pos,
        out_slots=torch.from_numpy(np.array(slots, dtype=np.int64)),
        req_rows=[r.table_row for r, _ in plan],
        prefix_lens=[r.kv_len for r, _ in plan],
        extend_lens=[n for _, n in plan],
        logits_rows=torch.empty(0, dtype=torch.int64),
    )
    if fold is None:
        return forward, np.arange(full_ids.numel(), dtype=np.int64)
    n = fold.num_rows
    forward.input_ids = torch.from_numpy(fold.compact_ids[:n].copy())
    forward.positions = torch.from_numpy(fold.compact_positions[:n].copy())
    forward.unfold = torch.from_numpy(fold.scatter.copy())
    forward.fold = torch.from_numpy(fold.fold_gather[:n].copy())
    return forward, fold.scatter


def _layout_tree(plan: list[tuple[Req, int]], fold: FoldPlan, cache: KVCacheManager) -> tuple[ForwardBatch, np.ndarray]:
    """Tree: compact rows get slots; sequences borrow the slots of rows a donor made."""
    n_rows = fold.num_rows
    cu = _seq_offsets(plan)
    own = np.array([n for _, n in plan], dtype=np.int64) - fold.folded_tokens
    row_cu = np.zeros(len(plan) + 1, dtype=np.int64)
    np.cumsum(own, out=row_cu[1:])
    # A sequence's own rows are a suffix of its tokens (once a trie path leaves
    # the shared part it never rejoins it), laid out contiguously in order.
    for i in range(len(plan)):
        if own[i]:
            first_local = fold.fold_gather[row_cu[i]] - cu[i]
            if first_local != fold.folded_tokens[i]:
                raise RuntimeError("fold plan: a sequence's own rows are not a suffix of its tokens")
    row_slots = np.array(_alloc(cache, int(own.sum())), dtype=np.int64)
    scatter = fold.scatter
    req_rows, prefix_lens, extend_lens = [], [], []
    for i, (req, _) in enumerate(plan):
        shared = int(fold.folded_tokens[i])
        seq_slots = row_slots[scatter[cu[i] : cu[i + 1]]].tolist()
        if shared:
            req.borrowed_len = req.kv_len + shared
        cache.extend(req, seq_slots)
        if own[i]:
            req_rows.append(req.table_row)
            prefix_lens.append(req.kv_len + shared)
            extend_lens.append(int(own[i]))
    forward = ForwardBatch(
        input_ids=torch.from_numpy(fold.compact_ids[:n_rows].copy()),
        positions=torch.from_numpy(fold.compact_positions[:n_rows].copy()),
        out_slots=torch.from_numpy(row_slots),
        req_rows=req_rows,
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        logits_rows=torch.empty(0, dtype=torch.int64),
    )
    return forward, fold.scatter


def _output_rows(batch: ScheduledBatch, row_of: np.ndarray) -> None:
    """Which computed rows the runner must return, per request and purpose."""
    logits: list[int] = []
    hidden: list[int] = []
    score_rows: list[int] = []
    score_targets: list[int] = []
    score_top: int | None = None
    offset = 0
    for req, n in zip(batch.reqs, batch.extend_lens):
        start = req.kv_len
        end = start + n
        task = req.prefill
        if task is None:  # generate
            if req.prompt_logprobs_pending:  # the row at position q predicts prompt token q + 1
                prompt = req.prompt_ids
                hi = min(end, len(prompt) - 1)
                batch.score_spans[id(req)] = (len(score_rows), len(score_rows) + max(0, hi - start))
                for q in range(start, hi):
                    score_rows.append(row_of[offset + q - start])
                    score_targets.append(prompt[q + 1])
                score_top = widest(score_top, req.params.prompt_logprobs)
            sampled = req.params.max_tokens > 0  # max_tokens 0 ends after the prompt (Scheduler.process)
            if sampled and end == req.fill_len + (id(req) in batch.ahead):  # its input is its newest token
                logits.append(row_of[offset + n - 1])
                batch.sample_reqs.append(req)
        elif task.kind == "embed":
            local = _pooled_rows(task.pooling, start, end, req.fill_len)
            batch.hidden_spans[id(req)] = (len(hidden), len(hidden) + len(local))
            hidden += [row_of[offset + i] for i in local]
        else:  # score: the row at position q predicts token q + 1
            lo = max(start, task.score_start - 1)
            hi = min(end, req.fill_len - 1)
            fill = req.fill_ids
            batch.score_spans[id(req)] = (len(score_rows), len(score_rows) + max(0, hi - lo))
            for q in range(lo, hi):
                score_rows.append(row_of[offset + q - start])
                score_targets.append(fill[q + 1])
        offset += n
    fwd = batch.forward
    fwd.logits_rows = torch.tensor(logits, dtype=torch.int64)
    if hidden:
        fwd.hidden_rows = torch.tensor(hidden, dtype=torch.int64)
    if score_rows:
        fwd.score_rows = torch.tensor(score_rows, dtype=torch.int64)
        fwd.score_targets = torch.tensor(score_targets, dtype=torch.int64)
        fwd.score_top = score_top


def _pooled_rows(pooling: str, start: int, end: int, fill_len: int) -> list[int]:
    """Chunk-local rows an embedding request needs from positions [start, end)."""
    if pooling == "mean":
        return list(range(end - start))
    if pooling == "cls":
        return [0] if start == 0 else []
    return [end - start - 1] if end == fill_len else []  # last
