"""The CPU backend: every sequence of a batch in one padded attention call per layer.

The reference (`torch`) runs one SDPA per sequence and layer; a decode step of
32 sequences on a 30-layer model is ~1,000 small calls plus as many K/V
gathers, and their overheads, not the arithmetic, made the step. Here a
batch's sequences are laid out once per batch as a padded pass:

    q_index  [B * N]    the q row of query t of sequence i (padding repeats a real row)
    slots    [B * L]    the slot of key j of sequence i (padding: the dummy slot 0)
    bias     [B, N, L]  0 where query t sees key j, -inf elsewhere (padding, causality)

and each layer makes one call of PyTorch's fused CPU attention kernel on K/V
laid out `[B, Hkv, L, D]`; it takes grouped-query heads without copies of K/V
and returns the log-sum-exp a cascade merges by. The passes that recur from step
to step (the decodes, a cascade's shared prefixes and its decoding suffixes) read
a kept copy of that layout (kv_mirror.py), into which each step copies only the
positions whose slot changed (in steady decode, one token per sequence); the
others gather K/V `[B * L, Hkv, D]` from the pool in one index_select per layer.

Padding costs work, so sequences are split into passes of like shapes: the
decodes (one query row each) form one pass; sequences with several new tokens
(prefill chunks) form another when padding them together wastes at most half
the work, or one pass each.

A shared prefix is read once per group (attention/cascade.py): with a cascade
plan, and on CPU without one as well, since this backend finds the sequences of
a batch whose slot lists start alike itself (`auto_cascade_plan`). The prefix
pass is a padded pass over groups, the suffix pass one over sequences, merged by
log-sum-exp as the GPU kernels do. All math runs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.cascade import merge_states
from radixserve.model_runner.attention.kv_mirror import KVMirror, MirrorPlan
from radixserve.model_runner.forward_batch import CascadePlan, ForwardBatch
from radixserve.model_runner.kv_pool import fold_kv_scales

# Sequences of several new tokens share one padded pass when it computes at most this many
# times the scores they need; otherwise each runs alone.
MAX_PADDING_WASTE = 2.0
# Neighbours sharing at least this many leading slots read them once per group (a second pass
# and a merge per layer buy it; the value is not tuned).
AUTO_CASCADE_MIN_PREFIX = 64
# (q, k, v, dropout, causal, *, attn_mask, scale) -> (out, lse); a private op of PyTorch's.
FUSED_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class PaddedPass(NamedTuple):
    """One batched attention call over sequences laid out as `[B, N]` queries x `[B, L]` keys."""

    q_index: torch.Tensor | None  # [B * N] int64 q rows; None: the q rows are 0..B-1 in order (N == 1)
    out_rows: torch.Tensor | None  # [V] int64 rows of q that this pass computes; None: all of q in order
    valid: torch.Tensor | None  # [B * N] bool: padded query rows that are real; None: all
    slots: torch.Tensor  # [B * L] int64
    bias: torch.Tensor | None  # [B, N, L] float32 additive mask; None: every key visible
    b: int
    n: int
    l: int
    mirror: tuple[KVMirror, MirrorPlan] | None = None  # K/V read from a kept copy (kv_mirror.py)
    # The kernel's own causal mask (query t sees keys j <= t, N == L), in place of `bias`: every
    # sequence's keys are its new tokens alone, and the kernel skips the blocks above the diagonal.
    causal: bool = False


def build_pass(
    req_to_token: torch.Tensor,
    rows: Sequence[int],
    key_starts: Sequence[int],
    key_lens: Sequence[int],
    q_starts: Sequence[int],
    q_lens: Sequence[int],
    causal: bool,
    total_q: int,
) -> PaddedPass:
    """Sequence i: q rows `q_starts[i] .. + q_lens[i]` against the slots
    `req_to_token[rows[i], key_starts[i] : key_starts[i] + key_lens[i]]`. Causal masking is
    aligned to the end: query t of n sees keys j <= key_len - n + t. Where every sequence's
    keys are its queries (a fresh prompt's chunk), that is the kernel's own causal mask: a
    real query t sees keys 0..t, never the padding past its sequence's end."""
    b, n, l = len(rows), max(q_lens), max(key_lens)
    own_causal = causal and n > 1 and list(key_lens) == list(q_lens)
    device = req_to_token.device
    key_len = torch.tensor(key_lens, dtype=torch.int64)
    q_len = torch.tensor(q_lens, dtype=torch.int64)
    j = torch.arange(l)
    cols = (torch.tensor(key_starts, dtype=torch.int64).unsqueeze(1) + j).clamp_(max=req_to_token.shape[1] - 1)
    slots = req_to_token[torch.tensor(rows, dtype=torch.int64).unsqueeze(1), cols.to(device)]
    key_ok = j < key_len.unsqueeze(1)  # [B, L]
    slots = slots.masked_fill(~key_ok.to(device), 0).reshape(-1)
    if n == 1:
        visible = key_ok.unsqueeze(1)  # [B, 1, L]
    else:
        t = torch.arange(n)
        visible = key_ok.unsqueeze(1).expand(b, n, l)
        if causal:
            last = (key_len - q_len).view(b, 1, 1) + t.view(1, n, 1)  # the last key query t sees
            visible = visible & (j.view(1, 1, l) <= last)
    bias = None
    if not own_causal and not bool(visible.all()):
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf")).to(device)
    starts = torch.tensor(q_starts, dtype=torch.int64)
    in_order = n == 1 and b == total_q and q_starts == list(range(b))
    if in_order:
        return PaddedPass(None, None, None, slots, bias, b, n, l)
    t = torch.arange(n)
    q_ok = t.unsqueeze(0) < q_len.unsqueeze(1)  # [B, N]
    q_index = (starts.unsqueeze(1) + torch.minimum(t.unsqueeze(0), (q_len - 1).unsqueeze(1))).reshape(-1)
    valid = None if bool(q_ok.all()) else q_ok.reshape(-1).to(device)
    out_rows = q_index if valid is None else q_index[q_ok.reshape(-1)]
    return PaddedPass(q_index.to(device), out_rows.to(device), valid, slots, bias, b, n, l, causal=own_causal)


def padded_attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    p: PaddedPass,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one pass in float32: out `[V, Hq, D]` for its real query rows, in the
    order of `p.out_rows`, and their log-sum-exp `[Hq, V]`. Every real row sees a key."""
    _, hq, d = q.shape
    hkv = k_cache.shape[1]
    b, n, l = p.b, p.n, p.l
    kv = None if p.mirror is None else p.mirror[0].read(p.mirror[1], k_cache, v_cache)
    if kv is not None:
        k, v = kv  # [B, Hkv, L, D] views of the kept copy
    else:
        # Whole slots in key order (the pool is read row by row); a head's keys are then a
        # strided view, which the kernel reads as it is.
        k = k_cache.index_select(0, p.slots).float().view(b, l, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        v = v_cache.index_select(0, p.slots).float().view(b, l, hkv, d).transpose(1, 2)
    qs = q if p.q_index is None else q.index_select(0, p.q_index)  # [B * N, Hq, D]
    qs = qs.float().view(b, n, hq, d).transpose(1, 2)  # [B, Hq, N, D]
    mask = None if p.bias is None else p.bias.view(b, 1, n, l)
    if FUSED_LSE is not None:
        out, lse = FUSED_LSE(qs, k, v, 0.0, p.causal, attn_mask=mask, scale=scale)  # [B, Hq, N, D], [B, Hq, N]
    else:
        if p.causal:
            mask = torch.full((n, l), float("-inf"), device=q.device).triu_(1).view(1, 1, n, l)
        out, lse = attend_lse_by_heads(qs, k, v, mask, scale)
    out = out.transpose(1, 2).reshape(b * n, hq, d)
    lse = lse.transpose(0, 1).reshape(hq, b * n)
    if p.valid is not None:
        out, lse = out[p.valid], lse[:, p.valid]
    return out.to(q.dtype), lse


def attend_lse_by_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain matmuls, one K/V head at a time, where torch lacks the fused op:
    a K/V head's query heads are extra query rows of it (no copies of K/V)."""
    b, hq, n, d = q.shape
    hkv, l = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, n), dtype=q.dtype, device=q.device)
    for h in range(hkv):
        heads = slice(h * g, (h + 1) * g)
        s = torch.bmm((q[:, heads] * scale).reshape(b, g * n, d), k[:, h].transpose(1, 2))  # [B, G * N, L]
        if mask is not None:
            s.view(b, g, n, l).add_(mask)
        lse_h = torch.logsumexp(s, dim=-1, keepdim=True)
        out[:, heads] = torch.bmm(s.sub_(lse_h).exp_(), v[:, h]).view(b, g, n, d)
        lse[:, heads] = lse_h.view(b, g, n)
    return out, lse


def split_passes(
    req_to_token: torch.Tensor,
    rows: Sequence[int],
    key_starts: Sequence[int],
    key_lens: Sequence[int],
    q_starts: Sequence[int],
    q_lens: Sequence[int],
    causal: bool,
    total_q: int,
) -> list[PaddedPass]:
    """Passes covering every sequence once (arguments as `build_pass`): the one-row
    sequences together, the others together where padding wastes little, else one pass
    each. Sequences with no query rows or no keys are left out."""
    ones = [i for i, (n, k) in enumerate(zip(q_lens, key_lens)) if n == 1 and k > 0]
    many = [i for i, (n, k) in enumerate(zip(q_lens, key_lens)) if n > 1 and k > 0]
    groups = [ones] if ones else []
    # Chunks whose keys are their own queries (fresh prompts) apart: they take the kernel's causal mask.
    fresh = [i for i in many if causal and q_lens[i] == key_lens[i]]
    for like in (fresh, [i for i in many if i not in fresh]):
        if not like:
            continue
        need = sum(q_lens[i] * key_lens[i] for i in like)
        padded = len(like) * max(q_lens[i] for i in like) * max(key_lens[i] for i in like)
        groups += [like] if padded <= MAX_PADDING_WASTE * need else [[i] for i in like]

    def pick(values: Sequence[int], idx: list[int]) -> list[int]:
        return [values[i] for i in idx]

    return [
        build_pass(
            req_to_token, pick(rows, idx), pick(key_starts, idx), pick(key_lens, idx),
            pick(q_starts, idx), pick(q_lens, idx), causal, total_q,
        )
        for idx in groups
    ]


def run_passes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, passes: list[PaddedPass]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pass's rows written into one `[T, Hq, D]` output and `[Hq, T]` lse; rows no pass
    covers are 0 (lse -inf)."""
    if len(passes) == 1 and passes[0].out_rows is None:
        return padded_attend(q, k_cache, v_cache, scale, passes[0])
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    for p in passes:
        assert p.out_rows is not None, "only a lone pass over all of q in order leaves out_rows None"
        o, s = padded_attend(q, k_cache, v_cache, scale, p)
        out.index_copy_(0, p.out_rows, o)
        lse.index_copy_(1, p.out_rows, s)
    return out, lse


def auto_cascade_plan(batch: ForwardBatch, req_to_token: torch.Tensor, min_prefix: int) -> CascadePlan | None:
    """Groups of consecutive sequences whose slot lists start with the same `min_prefix` or
    more slots, all computed before this batch (within each one's `prefix_lens`); None when
    no group of two forms. A group's prefix is its shortest shared run between neighbours."""
    b = batch.batch_size
    if b < 2:
        return None
    lens = torch.tensor(batch.prefix_lens, dtype=torch.int64)
    width = int(lens.max())
    if width < min_prefix:
        return None
    table = req_to_token[torch.tensor(batch.req_rows, dtype=torch.int64), :width]
    same = table[1:] == table[:-1]  # [B - 1, width]
    # Leading run of equal slots between neighbours i and i + 1 (cummin keeps 1 until the first 0).
    run = same.to(torch.int8).cummin(dim=1).values.sum(dim=1)
    runs: list[int] = torch.minimum(run, torch.minimum(lens[1:], lens[:-1])).tolist()
    plan = CascadePlan.from_runs(runs, min_prefix)
    return plan if max(plan.group_sizes) > 1 else None


class CascadePasses(NamedTuple):
    prefix: list[PaddedPass]  # one sequence per group with a shared prefix: its members' q rows
    suffix: list[PaddedPass]  # one per sequence: its keys after the shared prefix
    shared: torch.Tensor  # [T] bool: q rows whose group shares a prefix


def build_cascade_passes(batch: ForwardBatch, plan: CascadePlan, req_to_token: torch.Tensor) -> CascadePasses:
    """The prefix pass over groups sharing a prefix (lone sequences have none) and the suffix
    pass over every sequence's keys after its group's prefix."""
    extend_lens = batch.extend_lens
    cu_q = list(accumulate(extend_lens, initial=0))
    total = cu_q[-1]
    first = list(accumulate(plan.group_sizes, initial=0))  # group g's members: first[g] .. first[g + 1]
    groups = [g for g, p in enumerate(plan.prefix_lens) if p > 0]
    prefix = split_passes(
        req_to_token,
        [batch.req_rows[first[g]] for g in groups],
        [0] * len(groups),
        [plan.prefix_lens[g] for g in groups],
        [cu_q[first[g]] for g in groups],
        [cu_q[first[g + 1]] - cu_q[first[g]] for g in groups],
        causal=False,  # every shared key precedes every member's new tokens
        total_q=total,
    )
    shared_lens = plan.shared_lens
    suffix = split_passes(
        req_to_token, batch.req_rows, shared_lens, [s - p for s, p in zip(batch.seq_lens, shared_lens)],
        cu_q[:-1], extend_lens, causal=True, total_q=total,
    )
    shared = torch.repeat_interleave(
        torch.tensor([p > 0 for p in shared_lens]), torch.tensor(extend_lens), output_size=total
    ).to(req_to_token.device)
    return CascadePasses(prefix, suffix, shared)


class CPUAttention(AttentionBackend):
    name = "cpu"
    supports_cascade = True

    def __init__(self, auto_cascade_min_prefix: int = AUTO_CASCADE_MIN_PREFIX, mirrors: bool = True) -> None:
        self.auto_cascade_min_prefix = auto_cascade_min_prefix
        self._passes: list[PaddedPass] = []
        self._cascade: CascadePasses | None = None
        # Kept K/V copies of the passes that recur from step to step (kv_mirror.py), by role.
        self.use_mirrors = mirrors
        self._mirrors: dict[str, KVMirror] = {}

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        """The batch's passes; a shared prefix (planned, or found here) becomes a cascade."""
        self._passes, self._cascade = [], None
        plan = batch.cascade
        if plan is None and self.auto_cascade_min_prefix > 0:
            plan = auto_cascade_plan(batch, req_to_token, self.auto_cascade_min_prefix)
        if plan is not None:
            c = build_cascade_passes(batch, plan, req_to_token)
            used: set[str] = set()
            self._cascade = c._replace(
                prefix=self._mirrored(c.prefix, "prefix", batch.out_slots, used, every=True),
                suffix=self._mirrored(c.suffix, "suffix", batch.out_slots, used),
            )
        else:
            cu_q = list(accumulate(batch.extend_lens, initial=0))
            used = set()
            self._passes = self._mirrored(split_passes(
                req_to_token, batch.req_rows, [0] * batch.batch_size, batch.seq_lens, cu_q[:-1], batch.extend_lens,
                causal=True, total_q=cu_q[-1],
            ), "plain", batch.out_slots, used)
        for role, mirror in self._mirrors.items():
            if role not in used:
                mirror.forget()  # this batch's writes never reached it

    def release(self) -> None:
        """Drop the kept K/V copies and the last batch's passes."""
        self._mirrors.clear()
        self._passes, self._cascade = [], None

    def _mirrored(
        self, passes: list[PaddedPass], kind: str, written: torch.Tensor, used: set[str], every: bool = False
    ) -> list[PaddedPass]:
        """The passes, those that recur step to step reading kept K/V copies: the one-row
        (decode) passes, and with `every` all of them (a cascade's shared prefixes)."""
        if not self.use_mirrors:
            return passes
        out = []
        for i, p in enumerate(passes):
            if p.n == 1 or every:
                role = f"{kind}/{i}/{p.n == 1}"
                mirror = self._mirrors.setdefault(role, KVMirror())
                used.add(role)
                p = p._replace(mirror=(mirror, mirror.plan(p.slots.view(p.b, p.l), written)))
            out.append(p)
        return out

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # An fp8 pool is read as raw e4m3 values: its scales ride on q and on the output.
        dtype, (q, out_scale) = q.dtype, fold_kv_scales(q, k_scale, v_scale)
        out = self._attend(q, k_cache, v_cache, scale)
        return out if out_scale is None else (out * out_scale).to(dtype)

    def _attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        c = self._cascade
        if c is None:
            return run_passes(q, k_cache, v_cache, scale, self._passes)[0]
        o_prefix, lse_prefix = run_passes(q, k_cache, v_cache, scale, c.prefix)
        o_suffix, lse_suffix = run_passes(q, k_cache, v_cache, scale, c.suffix)
        return merge_states(o_prefix, lse_prefix, o_suffix, lse_suffix, c.shared)
