"""The Triton kernels of split-KV paged decode attention (imported only when triton is present).

triton_decode.py holds the entry point, the shapes and the choice of splits;
this module holds only device code, so that importing the entry never needs triton.

Work of one decode step (B sequences, one query token each, Hq = G * Hkv heads):

    split kernel   grid (Hkv, S, B). Program (h, s, b) takes the G query heads of KV
                   head h as one [BLOCK_H, D] tile (rows >= G are zero padding, so
                   tl.dot has its 16 rows) and keys [lo, hi) of sequence b, where the
                   sequence's length is cut into S chunks of a whole number of
                   BLOCK_N tiles. Each tile's slots come from the page table; each K
                   and V row is read once for all G heads. Online softmax in fp32.
                   With S == 1 it writes the output (and lse) directly.
    merge kernel   grid (Hq, B). Merges the S partial outputs by their log-sum-exp.

Invariant: only page-table entries [0, seqused_k[b]) are loaded, and only their K/V
rows: every load past a sequence's length is masked, so garbage there is never read.
Empty splits (lo >= hi) write lse = -inf and no output row; the merge gives them
weight 0 and does not load their rows.
Offsets into the pool are computed in int64 (slot * stride can pass 2^31).
Each tile's slots are loaded one iteration ahead, so the K/V loads of a tile depend on
no load of its own iteration and the pipeliner keeps num_stages - 1 K/V tiles in flight.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # globals read by a kernel must be constexpr


# The table's row stride is max_seqlen_k outside graphs (it changes per batch) and
# num_splits may be 1: keeping them unspecialized keeps one compile per tile config.
@triton.jit(do_not_specialize=["num_splits", "stride_pb"])
def split_kv_kernel(
    Q, K, V, PageTable, SeqUsed,
    PartOut, PartLse, Out, Lse,
    scale_log2,  # softmax scale * log2(e): scores live in base 2 for exp2
    num_splits,  # a runtime value: one compiled kernel serves every split count
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_pb,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    stride_lh, stride_lb,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,  # S == 1: write Out (and Lse) instead of the partials
    WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tests); bf16/fp16 ignore it
):
    # KV heads vary fastest in launch order: the Hkv programs of one (sequence, split) run
    # side by side and read the Hkv adjacent 256-byte pieces of the same slot rows together.
    kv_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    seq_len = tl.load(SeqUsed + b)
    # Each split takes a whole number of tiles, so only the last non-empty one is ragged.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h  # int64

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    table = PageTable + b * stride_pb
    # The slots of tile i + 1 are loaded in iteration i: then the K/V loads of a tile
    # depend on no load of their own iteration, and the pipeliner keeps num_stages - 1
    # tiles in flight (with the slot load inside the iteration, it kept one buffer at any
    # num_stages: seen in the TTGIR of triton 3.9 for sm_90).
    next_slots = tl.load(table + lo + offs_n, mask=lo + offs_n < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < hi
        slots = next_slots.to(tl.int64)
        next_slots = tl.load(table + pos + BLOCK_N, mask=pos + BLOCK_N < hi, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + slots[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N], fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds at least one key (start < hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slots[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))  # natural log
    if DIRECT:
        tl.store(
            Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
        if WRITE_LSE:
            tl.store(Lse + heads * stride_lh + b * stride_lb, lse, mask=h_mask)
    else:
        rows_written = offs_h < tl.where(hi > lo, GROUP, 0)  # an empty split writes lse only
        tl.store(
            PartOut + b * stride_pob + heads[:, None] * stride_poh + split * stride_pos + offs_d[None, :],
            out,
            mask=rows_written[:, None] & d_mask[None, :],
        )
        tl.store(PartLse + b * stride_plb + heads * stride_plh + split, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])
def merge_splits_kernel(
    PartOut, PartLse, Out, Lse,
    num_splits,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    stride_lh, stride_lb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(PartLse + b * stride_plb + head * stride_plh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    # A sequence with no keys at all: every lse is -inf; shift by 0 so no inf - inf appears.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # 0 for empty splits
    total = tl.sum(w, 0)
    # Empty splits wrote no output row: do not load it (its weight is 0 anyway).
    live = s_mask & (lse > float("-inf"))
    part = tl.load(
        PartOut + b * stride_pob + head * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :],
        mask=live[:, None] & d_mask[None, :],
        other=0.0,
    )
    total_safe = tl.where(total > 0.0, total, 1.0)
    out = tl.sum(part * w[:, None], 0) / total_safe
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)
    if WRITE_LSE:
        tl.store(Lse + head * stride_lh + b * stride_lb, tl.where(total > 0.0, m + tl.log(total_safe), float("-inf")))
