"""The Triton kernels of split-KV paged attention (imported only when triton is present).

triton_decode.py and triton_group.py hold the entry points, the shapes and the
choice of splits; this module holds only device code, so that importing an entry
never needs triton.

Both attend a tile of query rows over one sequence's keys, cut into S splits:

    split kernel   decode: grid (Hkv, S, B). Program (h, s, b) takes the G query heads
                   of KV head h of sequence b's one query row as one [BLOCK_H, D] tile
                   (rows >= G are zero padding, so tl.dot has its 16 rows).
    group kernel   cascade's prefix pass: grid (Hkv, S, Z). Program (h, s, z) takes the
                   z-th row chunk of the groups (each group's rows cut into chunks of
                   BLOCK_M // G query rows, counted group by group) and the G heads of
                   KV head h of each of its rows as one [BLOCK_M, D] tile:
                       tile row i = query row first + i // G, head h * G + i % G
                   Every row of a group attends to all of the group's keys (no mask).
    both           keys [lo, hi) of the sequence (group), where its length is cut into
                   S chunks of a whole number of BLOCK_N tiles. Each tile's slots come
                   from the page table; each K and V row is read once for the whole
                   query tile. Online softmax in fp32. With S == 1 they write the output
                   (and lse) directly.
    merge kernel   grid (Hq, rows). Merges the S partial outputs by their log-sum-exp.

An fp8 cache (KV_FP8, a constexpr: the bf16 kernels compile as without it): K and V
are float8_e4m3fn, head h's real rows stored * KScale[h] (VScale[h]). Tiles are loaded
as e4m3 (half the bytes of bf16) and widened in registers to fp16 (fp32 for fp32 q)
for both products: e4m3 -> fp16 is one instruction a pair on SM 8.9+, where -> bf16
takes two more, so a 16-bit q is taken to fp16 once, with the softmax scale folded in.
KScale[h] scales the scores and VScale[h] multiplies each program's normalized output,
so lse, partials and merge are those of the real values.

Page tables are gathered (`[B, W]`, row b is sequence b's) or indirect (the request
table itself, row b at `PageTable[TableRows[b], TableStart[b]:]`: no per-step gather
under CUDA graphs); int32 or int64 entries.

Invariant: only page-table entries [0, seqused_k) are loaded, and only their K/V rows:
every load past a sequence's length is masked, so garbage there is never read.
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
    Q, K, V, PageTable, SeqUsed, TableRows, TableStart,
    PartOut, PartLse, Out, Lse,
    KScale, VScale,  # [Hkv] float32 with KV_FP8 (stand-ins otherwise, never read)
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
    INDIRECT: tl.constexpr = False,  # row b of the table is PageTable[TableRows[b], TableStart[b]:]
    OFFSET: tl.constexpr = False,  # with INDIRECT: TableStart holds column offsets (else 0)
    KV_FP8: tl.constexpr = False,  # K, V are float8_e4m3fn: real = stored * KScale[h] (VScale[h])
):
    # KV heads vary fastest in launch order: the Hkv programs of one (sequence, split) run
    # side by side and read the Hkv adjacent 256-byte pieces of the same slot rows together.
    kv_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    lo, hi = _split_range(tl.load(SeqUsed + b), split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h  # int64

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out, lse = _attend_keys(
        q, K + kv_head * stride_kh, V + kv_head * stride_vh,
        _table_row(PageTable, TableRows, TableStart, b, stride_pb, True, INDIRECT, OFFSET), lo, hi,
        stride_ks, stride_vs, scale_log2, KScale + kv_head, VScale + kv_head,
        HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_N, DOT_PRECISION, KV_FP8,
    )
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


# num_groups changes with every eager batch; see split_kv_kernel for the other two.
@triton.jit(do_not_specialize=["num_groups", "num_splits", "stride_pb"])
def group_split_kv_kernel(
    Q, K, V, PageTable, SeqUsed, CuSeqlensQ, TableRows, TableStart,
    PartOut, PartLse, Out, Lse,
    KScale, VScale,
    scale_log2,
    num_groups,
    num_splits,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_pb,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    stride_ot, stride_oh,
    stride_lh, stride_lt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tile rows: BLOCK_M // GROUP query rows times GROUP heads
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups scanned per step when finding this program's chunk
    DIRECT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INDIRECT: tl.constexpr = False,  # as split_kv_kernel's, per group
    OFFSET: tl.constexpr = False,
    KV_FP8: tl.constexpr = False,
):
    # KV heads fastest, then splits, then chunks: the programs of one group's chunks run
    # side by side, so a group with several chunks reads its keys from L2 after the first.
    kv_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    rows_per_tile = BLOCK_M // GROUP
    group, chunk = _find_chunk(CuSeqlensQ, num_groups, tl.program_id(2), rows_per_tile, BLOCK_G)
    # Past the last chunk (the grid is a bound on the chunks): no rows, no keys, no stores.
    real = group < num_groups
    first = tl.load(CuSeqlensQ + group, mask=real, other=0) + chunk * rows_per_tile
    end = tl.minimum(first + rows_per_tile, tl.load(CuSeqlensQ + group + 1, mask=real, other=0))
    lo, hi = _split_range(tl.load(SeqUsed + group, mask=real, other=0), split, num_splits, BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = first + offs_m // GROUP
    m_mask = rows < end  # also drops tile rows >= rows_per_tile * GROUP (end <= first + rows_per_tile)
    live = rows < tl.where(hi > lo, end, 0)  # an empty split reads no q and writes lse only
    d_mask = offs_d < HEAD_DIM
    rows = rows.to(tl.int64)
    heads = kv_head * GROUP + offs_m % GROUP  # int64

    q = tl.load(
        Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=live[:, None] & d_mask[None, :],
        other=0.0,
    )
    out, lse = _attend_keys(
        q, K + kv_head * stride_kh, V + kv_head * stride_vh,
        _table_row(PageTable, TableRows, TableStart, group.to(tl.int64), stride_pb, real, INDIRECT, OFFSET),
        lo, hi, stride_ks, stride_vs, scale_log2, KScale + kv_head, VScale + kv_head,
        HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, DOT_PRECISION, KV_FP8,
    )
    if DIRECT:
        tl.store(
            Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )
        if WRITE_LSE:
            tl.store(Lse + heads * stride_lh + rows * stride_lt, lse, mask=m_mask)
    else:
        tl.store(
            PartOut + rows[:, None] * stride_pot + heads[:, None] * stride_poh + split * stride_pos + offs_d[None, :],
            out,
            mask=live[:, None] & d_mask[None, :],
        )
        tl.store(PartLse + rows * stride_plt + heads * stride_plh + split, lse, mask=m_mask)


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


@triton.jit
def _table_row(PageTable, TableRows, TableStart, index, stride_pb, valid, INDIRECT: tl.constexpr, OFFSET: tl.constexpr):
    """Where sequence (or group) `index`'s slots start: its own row of a gathered table, or
    with INDIRECT row TableRows[index] of the request table from column TableStart[index]
    (0 without OFFSET). `valid` False (a program past the last group) reads nothing."""
    table = PageTable + index * stride_pb
    if INDIRECT:
        table = PageTable + tl.load(TableRows + index, mask=valid, other=0).to(tl.int64) * stride_pb
        if OFFSET:
            table += tl.load(TableStart + index, mask=valid, other=0).to(tl.int64)
    return table


@triton.jit
def _split_range(seq_len, split, num_splits, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of split `split` of `num_splits` over a sequence of seq_len keys."""
    # Each split takes a whole number of tiles, so only the last non-empty one is ragged.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, seq_len)


@triton.jit
def _find_chunk(CuSeqlensQ, num_groups, chunk_id, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
    """(group, index in the group) of row chunk `chunk_id`, where group g's rows
    cu[g] .. cu[g + 1] form cdiv(rows, ROWS) chunks and chunks count group by group
    (a group without rows holds none). Past the last chunk: (num_groups, anything)."""
    group = tl.full([], 0, tl.int32)  # groups whose chunks all precede chunk_id
    first = tl.full([], 0, tl.int32)  # chunks those groups hold: where `group`'s chunks start
    total = tl.full([], 0, tl.int32)  # chunks of the groups scanned so far
    for base in range(0, num_groups, BLOCK_G):
        idx = base + tl.arange(0, BLOCK_G)
        scanned = idx < num_groups
        starts = tl.load(CuSeqlensQ + idx, mask=scanned, other=0)
        ends = tl.load(CuSeqlensQ + idx + 1, mask=scanned, other=0)
        chunk_ends = total + tl.cumsum(tl.cdiv(ends - starts, ROWS), 0)  # nondecreasing
        before = scanned & (chunk_ends <= chunk_id)
        group += tl.sum(before.to(tl.int32), 0)
        first = tl.maximum(first, tl.max(tl.where(before, chunk_ends, 0), 0))
        total = tl.max(chunk_ends, 0)
    return group, chunk_id - first


@triton.jit
def _attend_keys(
    q, k_head, v_head, table, lo, hi, stride_ks, stride_vs, scale_log2, k_scale_ptr, v_scale_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Attention of the [BLOCK_M, BLOCK_D] query tile over keys [lo, hi) of one KV head (its
    slots at table[lo:hi]): (out [BLOCK_M, BLOCK_D] fp32, lse [BLOCK_M] natural log), with
    out 0 and lse -inf where there are no keys. Inlined into each kernel.

    KV_FP8: the K and V rows are float8_e4m3fn, this head's real keys stored * k_scale
    (*k_scale_ptr) and values stored * v_scale. Tiles are loaded as fp8 (half the bytes)
    and widened for tl.dot to fp16 (fp32 for fp32 q): exact, every e4m3 value is an fp16
    and fp32 value. A bf16 or fp16 q is taken to fp16 once, times the softmax scale: the
    scaled row stays far inside fp16's range (|q| would need to pass 500,000 at D = 128)
    and rounds to fp16's 11 significant bits, finer than bf16's 8. The scores are then
    scaled by k_scale, so they, and from them m, l and the lse, are those of the real
    keys; v_scale multiplies the normalized output once, before any store, so the split
    merge sees real partial outputs."""
    if KV_FP8:
        if q.dtype == tl.float32:
            kv_dtype = tl.float32
            scale_log2 = scale_log2 * tl.load(k_scale_ptr)
        else:
            kv_dtype = tl.float16
            q = (q.to(tl.float32) * scale_log2).to(tl.float16)
            scale_log2 = tl.load(k_scale_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

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
        if KV_FP8:
            k = k.to(kv_dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N], fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds at least one key (start < hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slots[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(kv_dtype)  # and P (in [0, 1]) is finer in fp16 than in bf16
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))  # natural log
    return out, lse
