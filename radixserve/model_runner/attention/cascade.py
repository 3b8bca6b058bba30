"""Cascade attention: sequences that share a prefix's K/V attend to it once, as a group.

When 16 running requests share a 2,048-token system prompt (their slot lists
start with the same slots: cached in the radix tree, or borrowed from a
same-batch donor), a decode step without cascade reads those 2,048 tokens' K/V
16 times, and decode attention is bound by those reads. Cascade splits each
sequence's keys at its group's shared prefix (`ForwardBatch.cascade`) and runs
two varlen passes over the same pool:

    prefix  one varlen "sequence" per group: all of its members' query rows
            against the shared slots, without a causal mask (every shared key
            precedes every member's new tokens). The prefix is read once.
    suffix  one per sequence: its query rows against its own slots after the
            prefix, causal, aligned to the end (as without cascade).

Both passes return their log-sum-exp, and `merge_states` combines them exactly
(the algebra of split-KV decoding):

    o = (o_prefix * e^lse_prefix + o_suffix * e^lse_suffix) / (e^lse_prefix + e^lse_suffix)

A sequence alone in its group has an empty prefix pass (no keys, lse = -inf):
`shared` masks it out, so whatever a kernel writes for an empty row is never read.

Layouts follow metadata.py (VarlenMetadata) and the FlashAttention varlen
interface: outputs `[T, H, D]`, lse `[H, T]` float32 (natural log).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

import torch

from radixserve.model_runner.attention.metadata import VarlenMetadata, cumulative_lens
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.kv_pool import gather_kv
from radixserve.model_runner.transfer import to_device

# (q, k_cache, v_cache, scale, metadata, causal) -> (out [T, Hq, D], lse [Hq, T] float32)
AttendLSE = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float, VarlenMetadata, bool], tuple[torch.Tensor, torch.Tensor]
]


class CascadeMetadata(NamedTuple):
    prefix: VarlenMetadata  # per group: its members' q rows against the shared slots
    suffix: VarlenMetadata  # per sequence: its q rows against its slots after the shared ones
    shared: torch.Tensor  # [T] bool: q rows whose group shares a prefix


def build_cascade_metadata(batch: ForwardBatch, req_to_token: torch.Tensor) -> CascadeMetadata:
    """Both passes' metadata for `batch` (its `cascade` plan set), with one host->device copy."""
    plan = batch.cascade
    assert plan is not None, "build_cascade_metadata needs a batch with a cascade plan"
    extend_lens = batch.extend_lens
    shared = plan.shared_lens
    suffix_lens = [s - p for s, p in zip(batch.seq_lens, shared)]
    cu_q = list(accumulate(extend_lens, initial=0))
    first = list(accumulate(plan.group_sizes, initial=0))  # group g's members: first[g] .. first[g + 1]
    group_cu_q = [cu_q[i] for i in first]
    group_rows = [batch.req_rows[i] for i in first[:-1]]
    b, g = len(extend_lens), len(plan.group_sizes)
    decode = max(extend_lens) == 1  # every sequence adds one token: a decode step
    ints = (
        cu_q + list(accumulate(suffix_lens, initial=0)) + suffix_lens + shared + list(batch.req_rows)
        + group_cu_q + list(accumulate(plan.prefix_lens, initial=0)) + plan.prefix_lens + group_rows
    )
    dev = to_device(torch.tensor(ints, dtype=torch.int32), req_to_token.device)
    parts = iter(torch.split(dev, [b + 1, b + 1, b, b, b, g + 1, g + 1, g, g]))
    cu_seqlens_q, cu_suffix, suffix_used, shared_dev, rows = (next(parts) for _ in range(5))
    group_cu, cu_prefix, prefix_used, first_rows = (next(parts) for _ in range(4))

    width = max(suffix_lens)
    suffix_table = _offset_rows(req_to_token, rows.long(), shared_dev.long(), width)
    max_prefix = max(plan.prefix_lens)  # > 0: a plan saves reads
    prefix_table = req_to_token[:, :max_prefix].index_select(0, first_rows.long()).to(torch.int32)
    row_shared = torch.repeat_interleave(shared_dev > 0, cu_seqlens_q.diff(), output_size=cu_q[-1])
    return CascadeMetadata(
        prefix=VarlenMetadata(
            cu_seqlens_q=group_cu,
            seqused_k=prefix_used,
            cu_seqlens_k=cu_prefix,
            page_table=prefix_table,
            max_seqlen_q=max(b - a for a, b in zip(group_cu_q, group_cu_q[1:])),
            max_seqlen_k=max_prefix,
            total_k=sum(plan.prefix_lens),
            decode_rows=decode,
        ),
        suffix=VarlenMetadata(
            cu_seqlens_q=cu_seqlens_q,
            seqused_k=suffix_used,
            cu_seqlens_k=cu_suffix,
            page_table=suffix_table,
            max_seqlen_q=max(extend_lens),
            max_seqlen_k=width,
            total_k=sum(suffix_lens),
            decode_rows=decode,
        ),
        shared=row_shared,
    )


def graph_cascade_metadata(
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    shared_lens: torch.Tensor,
    group_cu_q: torch.Tensor,
    group_rows: torch.Tensor,
    group_prefix: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    req_to_token: torch.Tensor,
    indirect: bool = False,
) -> CascadeMetadata:
    """A decode batch's cascade metadata from device tensors only (CUDA-graph capturable).

    Per sequence `[B]` int64: `req_rows`, `seq_lens`, `shared_lens`; per group, padded to B
    groups: `group_cu_q` `[B + 1]` int32 (members of group g are rows group_cu_q[g] ..
    group_cu_q[g + 1]; trailing groups empty), `group_rows` (a member's request row) and
    `group_prefix` `[B]` int64. Host bounds are fixed: B query rows per group, the table's
    width of keys. `total_k` is unknown on the host (-1): page-table kernels only.
    `indirect`: both passes read the request table through row indices (and, for the
    suffix, column offsets) instead of gathered `[B, width]` tables (metadata.py).
    """
    width = req_to_token.shape[1]
    prefix_used = group_prefix.to(torch.int32)
    suffix_used = (seq_lens - shared_lens).to(torch.int32)
    if indirect:
        prefix_table, prefix_rows = req_to_token, group_rows
        suffix_table, suffix_rows, suffix_start = req_to_token, req_rows, shared_lens
    else:
        prefix_table, prefix_rows = req_to_token.index_select(0, group_rows).to(torch.int32), None
        suffix_table, suffix_rows, suffix_start = _offset_rows(req_to_token, req_rows, shared_lens, width), None, None
    return CascadeMetadata(
        prefix=VarlenMetadata(
            cu_seqlens_q=group_cu_q,
            seqused_k=prefix_used,
            cu_seqlens_k=cumulative_lens(prefix_used),
            page_table=prefix_table,
            max_seqlen_q=int(req_rows.shape[0]),
            max_seqlen_k=width,
            total_k=-1,
            table_rows=prefix_rows,
            decode_rows=True,
        ),
        suffix=VarlenMetadata(
            cu_seqlens_q=cu_seqlens_q,
            seqused_k=suffix_used,
            cu_seqlens_k=cumulative_lens(suffix_used),
            page_table=suffix_table,
            max_seqlen_q=1,
            max_seqlen_k=width,
            total_k=-1,
            table_rows=suffix_rows,
            table_start=suffix_start,
            decode_rows=True,
        ),
        shared=shared_lens > 0,
    )


def _offset_rows(req_to_token: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] int32: row i is `req_to_token[rows[i], start[i]:]`; columns past the table's
    end repeat its last entry (beyond each sequence's seqused_k: never read)."""
    cols = start.unsqueeze(1) + torch.arange(width, device=rows.device)
    cols.clamp_(max=req_to_token.shape[1] - 1)
    return req_to_token[rows.unsqueeze(1), cols].to(torch.int32)


def merge_states(
    o_prefix: torch.Tensor, lse_prefix: torch.Tensor, o_suffix: torch.Tensor, lse_suffix: torch.Tensor,
    shared: torch.Tensor,
) -> torch.Tensor:
    """Attention over prefix + suffix keys from the two passes' outputs `[T, H, D]` and lse
    `[H, T]`; rows not `shared` take the suffix pass as is (its lse is finite: every
    sequence's suffix holds at least its newest token)."""
    lp = torch.where(shared, lse_prefix, float("-inf")).t().unsqueeze(-1)  # [T, H, 1]
    ls = lse_suffix.t().unsqueeze(-1)
    m = torch.maximum(lp, ls)
    wp = torch.exp(lp - m)
    ws = torch.exp(ls - m)
    op = torch.where(shared[:, None, None], o_prefix.float(), 0.0)
    return ((op * wp + o_suffix.float() * ws) / (wp + ws)).to(o_suffix.dtype)


def cascade_attend(
    attend_lse: AttendLSE,
    merge: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    meta: CascadeMetadata,
) -> torch.Tensor:
    """One layer's cascade attention: the prefix pass, the suffix pass, their merge."""
    o_prefix, lse_prefix = attend_lse(q, k_cache, v_cache, scale, meta.prefix, False)
    o_suffix, lse_suffix = attend_lse(q, k_cache, v_cache, scale, meta.suffix, True)
    return merge(o_prefix, lse_prefix, o_suffix, lse_suffix, meta.shared)


def reference_attend_lse(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, meta: VarlenMetadata, causal: bool,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of one varlen pass with its lse, in float32, per sequence (an fp8
    pool's values dequantized with `k_scale`/`v_scale`).

    Causal masking is aligned to the end: query t of n sees keys j <= L - n + t.
    A sequence with no keys gets output 0 and lse -inf."""
    total, heads, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((heads, total), float("-inf"), dtype=torch.float32, device=q.device)
    cu = meta.cu_seqlens_q.tolist()
    used = meta.seqused_k.tolist()
    for i, n_keys in enumerate(used):
        start, end = cu[i], cu[i + 1]
        if end == start or n_keys == 0:
            continue
        slots = meta.page_table[i, :n_keys].long()
        qi = q[start:end].float()  # [n, Hq, D]
        group = heads // k_cache.shape[1]
        ki = gather_kv(k_cache, slots, k_scale, torch.float32).repeat_interleave(group, dim=1)  # [L, Hq, D]
        vi = gather_kv(v_cache, slots, v_scale, torch.float32).repeat_interleave(group, dim=1)
        s = torch.einsum("nhd,lhd->hnl", qi, ki) * scale
        if causal:
            n = end - start
            q_pos = torch.arange(n, device=q.device).unsqueeze(1) + (n_keys - n)
            s = s.masked_fill(torch.arange(n_keys, device=q.device).unsqueeze(0) > q_pos, float("-inf"))
        lse_i = torch.logsumexp(s, dim=-1)  # [Hq, n]
        p = torch.exp(s - lse_i.unsqueeze(-1))
        out[start:end] = torch.einsum("hnl,lhd->nhd", p, vi).to(q.dtype)
        lse[:, start:end] = lse_i
    return out, lse
