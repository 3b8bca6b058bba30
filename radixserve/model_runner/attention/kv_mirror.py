"""A padded copy of the K/V that a recurring attention pass reads, kept from step to step.

The CPU backend attends a pass of B sequences over K/V laid out `[B, Hkv, L, D]`
per layer. Gathered from the pool's slots every step, that copies every
sequence's whole K/V per layer: at 32 sequences of 320 tokens on the built-in
SmolLM2-135M, ~500 MB a decode step, more than the weights, and the kernel then
reads it again. From one decode step to the next only each sequence's newest
token is new, so the mirror keeps the padded layout in place per layer and each
step copies in only the positions whose slot changed:

    record   [b, l] int64      slot whose K/V every layer's copy holds at (i, j) of the last
                               window; -1: nothing known
    copies   per layer (k, v)  [Bcap, Hkv, Lcap, D] float32, capacity >= the window, so a
                               window growing by a token a step reallocates once per
                               `LEN_STEP` tokens; a larger copy starts with what the
                               smaller one held

Sequences change rows as others finish or join (the batch keeps its order, so the
rows after a finished sequence move up). A row of the new window whose first slot
was the first slot of some row of the last window takes that row's copy (`moves`,
copied row to row before anything else): its keys are then known but for the new
token. The match only saves copying; what decides what is copied in is still the
comparison of each position's slot with what the moved row's record held.

Invariant (kept by `plan` and `read`): a layer's copy marked with the last plan's
step holds, at every (i, j) of that window, the pool's K/V of `record[i, j]` as it
was when read (after this plan's row moves, at (i, j) that of the record of the row
moved to i). Positions outside the last window are forgotten. A slot's K/V only
changes when a forward writes it, and every write is in some batch's `out_slots`:
`plan` forgets every position whose slot this batch writes (the new tokens' slots,
written before each layer's read), so what it keeps is what the pool holds. A mirror
left out of a batch forgets everything (`forget`), since that batch's writes never
reached it. Padding positions (slot 0, the dummy) are never copied in: what they hold
(zeros, or K/V read before) is finite and masked out, and a real slot is never 0.

A mirror never holds more entries (`Bcap * Lcap`) than the pool has slots; past
that, `read` answers None and the caller gathers as before.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

LEN_STEP = 64  # capacity along the keys grows in these steps, with at least LEN_HEADROOM spare
LEN_HEADROOM = 16


class MirrorPlan(NamedTuple):
    """One batch's use of a mirror: the window's slots and the positions to copy in."""

    step: int
    slots: torch.Tensor  # [b, l] int64: the window (padding: slot 0)
    stale_b: torch.Tensor  # [n] int64: rows of the positions whose slot changed since the last plan
    stale_j: torch.Tensor  # [n] int64: their key positions
    stale_slots: torch.Tensor  # [n] int64: their new slots
    # (to rows, from rows) [m] int64 each: rows of the copies taking another row's content
    # before the copy-in (sequences that changed rows); None: every row stays
    moves: tuple[torch.Tensor, torch.Tensor] | None = None


class _LayerCopy(NamedTuple):
    pool_k: weakref.ref  # the pool tensor this copy mirrors (a new or freed pool is a fresh copy)
    k: torch.Tensor  # [Bcap, Hkv, Lcap, D] float32
    v: torch.Tensor
    step: int  # the plan this copy was last brought up to


class KVMirror:
    """The per-layer copies of one recurring pass (the decodes, or a cascade's prefix or suffix)."""

    def __init__(self) -> None:
        self.step = 0
        self.record: torch.Tensor | None = None  # [b, l] int64
        self.b_cap = 0
        self.l_cap = 0
        self.layers: dict[int, _LayerCopy] = {}
        self.oversized = False  # the last window's copy would have outgrown the pool

    def forget(self) -> None:
        """Nothing known any more (a batch this mirror did not see may have rewritten slots)."""
        self.record = None

    def plan(self, slots: torch.Tensor, written: torch.Tensor) -> MirrorPlan:
        """The window `slots` `[b, l]` of this batch, whose forward writes the slots `written`."""
        self.step += 1
        b, n_keys = slots.shape
        l_cap = -(-(n_keys + LEN_HEADROOM) // LEN_STEP) * LEN_STEP
        if self.oversized:  # every layer's copy starts afresh, sized for this window
            self.b_cap, self.l_cap, self.oversized = b, l_cap, False
            self.layers.clear()
            self.record = None
        elif b > self.b_cap or n_keys > self.l_cap:  # the copies grow in `read`, keeping what they hold
            self.b_cap, self.l_cap = max(b, self.b_cap), max(l_cap, self.l_cap)
        known = torch.full((b, n_keys), -1, dtype=torch.int64, device=slots.device)
        moves = None
        if self.record is not None:
            moves = self._match_rows(slots, known)
            written = written[written != 0]  # the dummy slot: padding's writes, never read unmasked
            if written.numel():
                known.masked_fill_(torch.isin(known, written), -1)
        stale = (known != slots) & (slots != 0)  # padding's content need only be finite
        stale_b, stale_j = stale.nonzero(as_tuple=True)
        self.record = slots
        return MirrorPlan(self.step, slots, stale_b, stale_j, slots[stale], moves)

    def _match_rows(self, slots: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fill `known` `[b, l]` with the record of the row each new row takes its copy from (the
        first old row with its first slot; none: -1); returns the rows that move (to, from)."""
        record = self.record
        assert record is not None, "called with a record"
        rl = min(slots.shape[1], record.shape[1])
        first = slots[:, 0]
        same = (first.unsqueeze(1) == record[:, 0].unsqueeze(0)) & (first != 0).unsqueeze(1)  # [b, old b]
        found = same.any(dim=1)
        source = same.to(torch.int8).argmax(dim=1)  # the first match
        rows = torch.arange(slots.shape[0], device=slots.device)
        known[found, :rl] = record[source[found], :rl]
        moved = found & (source != rows)
        if not bool(moved.any()):
            return None
        return rows[moved], source[moved]

    def read(
        self, plan: MirrorPlan, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's K/V of the window, `[b, Hkv, l, D]` float32 views of its copy, brought up
        to date from the pool (`k_cache`, `v_cache` `[slots, Hkv, D]`, this batch's new K/V
        already written); None where the copy would outgrow the pool (the caller gathers)."""
        if self.b_cap * self.l_cap > k_cache.shape[0]:
            self.forget()
            self.layers.clear()
            self.oversized = True  # the next plan sizes the copies for its own window
            return None
        b, n_keys = plan.slots.shape
        entry = self.layers.get(id(k_cache))
        hkv, d = k_cache.shape[1], k_cache.shape[2]
        shape = (self.b_cap, hkv, self.l_cap, d)
        if entry is None or entry.pool_k() is not k_cache:
            entry = _LayerCopy(weakref.ref(k_cache), torch.zeros(shape, device=k_cache.device),
                               torch.zeros(shape, device=k_cache.device), -1)
        elif entry.k.shape != shape:  # grown: the larger copies start with what these hold
            entry = entry._replace(k=_grown(entry.k, shape), v=_grown(entry.v, shape))
        if entry.step == plan.step - 1:  # up to date with the last window: copy in what changed
            if plan.moves is not None:
                to_rows, from_rows = plan.moves
                for copy in (entry.k, entry.v):
                    copy.index_copy_(0, to_rows, copy.index_select(0, from_rows))
            if plan.stale_slots.numel():
                for cache, copy in ((k_cache, entry.k), (v_cache, entry.v)):
                    copy.permute(0, 2, 1, 3).index_put_(
                        (plan.stale_b, plan.stale_j), cache.index_select(0, plan.stale_slots).float()
                    )
        elif entry.step != plan.step:  # fresh, or missed a plan: the whole window
            flat = plan.slots.reshape(-1)
            for cache, copy in ((k_cache, entry.k), (v_cache, entry.v)):
                gathered = cache.index_select(0, flat).float().view(b, n_keys, *cache.shape[1:])
                copy[:b, :, :n_keys].copy_(gathered.transpose(1, 2))
        self.layers[id(k_cache)] = entry._replace(step=plan.step)
        return entry.k[:b, :, :n_keys], entry.v[:b, :, :n_keys]


def _grown(copy: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """`copy` `[b, Hkv, l, D]` in the corner of a zeroed tensor of the larger `shape`."""
    out = torch.zeros(shape, dtype=copy.dtype, device=copy.device)
    out[: copy.shape[0], :, : copy.shape[2]] = copy
    return out
