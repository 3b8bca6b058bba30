"""Cascade's prefix pass in Triton: every query row of a group against the group's shared keys.

In a cascade decode step (attention/cascade.py) the prefix pass is one varlen
"sequence" per group: its members' query rows (one per member) against the
group's shared prefix, without a mask. Each K/V row of a prefix should then be
read once for all members and all query heads. Here a group's rows are cut into
chunks of R = BLOCK_M // G rows (G = Hq / Hkv), numbered group by group, and

    program (h, s, z)   takes chunk z's R query rows times the G query heads of KV
                        head h as the rows of one [BLOCK_M, D] tile
                            tile row i = query row first + i // G, head h * G + i % G
                        and attends it over split s of its group's keys

so a group of up to R members reads its prefix once per KV head, and a larger
group (every request behind one system prompt) runs one program per chunk side by
side, the chunks after the first mostly reading the keys from L2. The splits, the
online softmax and the merge are
those of the decode kernel (triton_decode.py, triton_decode_kernels.py); partials
are kept per query row, so the decode merge serves as is.

Inputs are what `VarlenMetadata` holds for the pass: `cu_seqlens_q` `[G + 1]`,
`seqused_k` `[G]`, `page_table` `[G, W]`, all int32 on the device. Nothing on the
host depends on their contents: the grid is (Hkv, S, Z) with Z a bound on the
chunks from shapes (`max_chunks`), each program finds its chunk's group by scanning
cu_seqlens_q in the kernel, and programs past the last chunk store nothing. So a
call is CUDA-graph capturable, with groups padded as `graph_cascade_metadata` pads
them (empty groups hold no chunk; a group without keys writes out 0, lse -inf).

Triton is optional: this module imports without it; a call raises ImportError.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from radixserve.model_runner.attention.triton_decode import (
    DecodeWorkspace,
    KernelOutputs,
    KVScales,
    TableRef,
    check_kv_scales,
    check_qkv,
    check_table,
    check_tiling,
    choose_num_splits,
    launch_split,
    prepare_outputs,
)

SCAN_BLOCK = 1024  # groups a program scans per step to find its chunk: one step up to 1,024 groups


class GroupKernelConfig(NamedTuple):
    """Tile shape and launch options of the group kernel. block_m = 64 holds 32 members at
    G = 2 (16 at G = 4) in one tile, the size of a Hopper warpgroup MMA; the benchmark
    sweeps the rest."""

    block_m: int = 64  # tile rows: block_m // G query rows times G heads
    block_n: int = 64  # keys per loop iteration
    num_warps: int = 4
    num_stages: int = 2  # K/V tiles in flight = num_stages - 1


# The engine's tile config over a bf16/fp16 pool, for the prefix pass as CUDA graphs run
# it (groups padded to one per row): the fastest in every graph-padded case measured on
# the H100 (64 x 16, 256 x ~4 and 1 x 1,024 members over 2,048-token prefixes; GQA 2 and
# 4): 2.30 TB/s where FA4 reads 1.71.
GROUP_CONFIG = GroupKernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)

# The tile config over an fp8 cache: an e4m3 tile of 64 keys is the bytes of a bf16 tile
# of 32, so the keys per iteration double at the bf16 config's bytes in flight and shared
# memory (~64 KB).
FP8_GROUP_CONFIG = GroupKernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)


def max_chunks(rows: int, groups: int, group_size: int, block_m: int) -> int:
    """The grid's bound Z on the row chunks of T = `rows` query rows in `groups` groups.

    With R = block_m // group_size rows per chunk, the chunks number
    sum over groups of ceil(rows_g / R): at most T (a chunk holds a row), and at most
    (T + (R - 1) * min(groups, T)) // R (each group with rows wastes at most R - 1 of
    its last chunk). A graph's padded groups (G = T) give Z = T."""
    per_chunk = block_m // group_size
    if per_chunk < 1:
        raise ValueError(f"config.block_m {block_m} must be >= Hq / Hkv = {group_size}")
    return min(rows, (rows + (per_chunk - 1) * min(groups, rows)) // per_chunk)


def choose_group_splits(
    rows: int,
    groups: int,
    q_heads: int,
    kv_heads: int,
    num_sms: int,
    config: GroupKernelConfig = GroupKernelConfig(),
    waves: int = 8,
    max_splits: int = 16,
) -> int:
    """Splits for the prefix pass: `choose_num_splits` with the chunk bound Z in place of
    the batch, so that Hkv * S * Z programs number `waves` per SM. Shapes only.

    Eager, Z is close to the real chunk count (about one per group in a decode step).
    In a graph the groups are padded to the batch (G = T = B) and Z = B, however few
    groups there are: S is then what B one-chunk groups would need (1 from B = 132 at
    Hkv = 8). A step with few groups then runs fewer programs than the SMs could hold;
    splitting more for it would cost every step Hkv * Z programs per split, mostly past
    the last chunk (each scans cu_seqlens_q and stores nothing), and a group of k rows
    k * Hq * (D + 1) floats of partials per split, against one read of its prefix.
    `benchmarks/decode_kernel_bench.py` (graph-padded cases) measures S for that trade.
    """
    if q_heads % kv_heads != 0:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}")
    chunks = max_chunks(rows, groups, q_heads // kv_heads, config.block_m)
    return choose_num_splits(max(1, chunks), kv_heads, num_sms, waves, max_splits)


def paged_group_attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    return_lse: bool = False,
    config: GroupKernelConfig = GroupKernelConfig(),
    table_rows: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row of group g over all of the group's `seqused_k[g]` keys.

    q `[T, Hq, D]`; k_cache, v_cache `[slots, Hkv, D]` (Hq a multiple of Hkv);
    cu_seqlens_q `[G + 1]` int32, nondecreasing, within 0..T (group g's rows are
    cu_seqlens_q[g] .. cu_seqlens_q[g + 1]); page_table `[G, W]` int32 (row g's first
    seqused_k[g] entries are its slots); seqused_k `[G]` int32. No causal mask.
    Returns out `[T, Hq, D]` in q's dtype, and with `return_lse` also lse `[Hq, T]`
    float32, natural log, -inf for a row whose group has no keys (its output is 0): the
    layout cascade.merge_states takes. Rows outside every group are not written.
    `workspace` (for num_splits > 1) is `make_workspace(>= T, Hq, D, num_splits)`.
    With `table_rows` `[G]`, page_table is any `[R, W]` table (int32 or int64) read in
    place: group g's slots are `page_table[table_rows[g]]` (no gathered copy).
    An fp8 cache (float8_e4m3fn) takes `k_scale`, `v_scale` as paged_decode does.
    """
    rows, groups = _check_inputs(
        q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q, num_splits, config, table_rows
    )
    scales = check_kv_scales(k_cache, k_scale, v_scale)
    out, lse, workspace = prepare_outputs(q, out, workspace, return_lse, num_splits)
    if rows > 0 and groups > 0:
        table = TableRef.of(page_table, seqused_k, table_rows, None)
        _launch(q, k_cache, v_cache, table, seqused_k, cu_seqlens_q, scale, num_splits, out, lse, workspace, config,
                scales)
    return out if lse is None else (out, lse)  # lse is None unless return_lse


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: TableRef,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    workspace: DecodeWorkspace | None,
    config: GroupKernelConfig,
    scales: KVScales | None,
) -> None:
    """The group kernel, then (S > 1) the merge over every row."""
    rows, q_heads, _ = q.shape
    groups = seqused_k.shape[0]
    kv_heads = k_cache.shape[1]
    group_size = q_heads // kv_heads
    chunks = max_chunks(rows, groups, group_size, config.block_m)
    launch_split(
        "group_split_kv_kernel", (kv_heads, num_splits, chunks), (seqused_k, cu_seqlens_q), (groups, num_splits),
        q, k_cache, v_cache, table, scale, out, KernelOutputs.of(out, lse, workspace), num_splits, config, scales,
        GROUP=group_size,
        BLOCK_M=config.block_m,
        BLOCK_G=SCAN_BLOCK,
    )


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    num_splits: int,
    config: GroupKernelConfig,
    table_rows: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Shape, dtype and layout checks (host metadata only: no device sync); (T, G)."""
    rows = check_qkv(q, k_cache, v_cache, "T")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must be [G + 1] int32, got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}")
    if not cu_seqlens_q.is_contiguous():
        raise ValueError("cu_seqlens_q must be contiguous")
    groups = cu_seqlens_q.shape[0] - 1
    check_table(page_table, seqused_k, groups, "G", table_rows)
    check_tiling(num_splits, config.block_n)
    group_size = q.shape[1] // k_cache.shape[1]
    block_m = config.block_m
    if block_m < max(16, group_size) or block_m & (block_m - 1):
        raise ValueError(
            f"config.block_m must be a power of two >= 16 and >= Hq / Hkv = {group_size}, got {block_m}"
        )
    return rows, groups
