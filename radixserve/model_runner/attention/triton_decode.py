"""Split-KV ("flash-decoding") paged decode attention in Triton, over the token-granular pool.

A decode batch is B sequences of one query token each. A kernel that gives one
program to each (sequence, KV head) runs B * Hkv programs, which at small B or
long contexts leaves most SMs idle while a few walk long key lists. Here each
sequence's keys are cut into a fixed number S of splits: B * Hkv * S programs each
attend over one chunk (all G = Hq / Hkv query heads of a KV head at once, so each
K/V row is read once), and a second small kernel merges the S partial outputs by
their log-sum-exp (the same algebra as cascade.merge_states).

Inputs are what `VarlenMetadata` holds for a decode batch: `page_table` `[B, W]`
int32 and `seqused_k` `[B]` int32 on the device. Nothing on the host depends on
their contents: the grid is (Hkv, S, B) and each split finds its range from
seqused_k in the kernel, so a call is CUDA-graph capturable (S is fixed per
captured batch size; see `choose_num_splits`). Buffers are allocated from shapes
only, or passed in (`make_workspace`). triton_group.py (cascade's prefix pass: many
query rows per sequence) shares the kernels' loop and merge, and the host helpers here.

Triton is optional: this module imports without it; a call raises ImportError.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import NamedTuple, Protocol

import torch

LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn  # the one fp8 KV cache dtype the kernels read
MAX_SPLITS = 64  # the merge kernel holds one [S, D] tile
MAX_GRID_YZ = 65535  # the batch is the split grid's z dimension


class DecodeWorkspace(NamedTuple):
    """Per-split results; the first dim may exceed B (a buffer sized for the largest batch)."""

    partial_out: torch.Tensor  # [>= B, Hq, S, D] float32
    partial_lse: torch.Tensor  # [>= B, Hq, S] float32, natural log


class TileConfig(Protocol):
    """What launch_split reads of a kernel's config (KernelConfig, triton_group's GroupKernelConfig)."""

    @property
    def block_n(self) -> int: ...
    @property
    def num_warps(self) -> int: ...
    @property
    def num_stages(self) -> int: ...


class KernelConfig(NamedTuple):
    """Tile shape and launch options of the split kernel. The default keeps two K/V tiles
    in flight in ~70 KB of shared memory (three programs per H100 SM); the benchmark
    sweeps the rest."""

    block_n: int = 64  # keys per loop iteration
    num_warps: int = 4
    num_stages: int = 3  # K/V tiles in flight = num_stages - 1


# The engine's tile config over a bf16/fp16 pool: the fastest or within 1% of it in every
# case measured on the H100 (256 x 100-2048, 256 x 1024, 64 x 4096 and 1,024 x 129-385
# keys; GQA 2 and 4).
DECODE_CONFIG = KernelConfig(block_n=128, num_warps=4, num_stages=2)

# The tile config over an fp8 cache: the fastest tile of the fp8 sweep on the H100 in all
# 8 of decode_kernel_bench's decode cases, 1.51-1.73x as fast as DECODE_CONFIG over a bf16
# pool (docs/benchmarks.md). Two 16 KB K+V tiles in flight per program at ~146 registers
# a thread (three programs an SM), where 128-key tiles take ~198 (two). The split count
# is chosen as for bf16 (choose_num_splits counts programs, not bytes).
FP8_DECODE_CONFIG = KernelConfig(block_n=64, num_warps=4, num_stages=3)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (asked once: the pool's write asks on every eager step)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_kernels() -> ModuleType:
    try:
        return importlib.import_module("radixserve.model_runner.attention.triton_decode_kernels")
    except ImportError as exc:
        raise ImportError("split-KV attention needs the triton package (pip install triton)") from exc


def choose_num_splits(batch: int, kv_heads: int, num_sms: int, waves: int = 8, max_splits: int = 16) -> int:
    """Splits per sequence so that B * Hkv * S programs number at least `waves` per SM.

    Depends on shapes only (never on lengths), so one value serves every replay of a
    graph captured for `batch` rows. Two to four programs run on an SM at once (they
    are bound by shared memory for the pipelined K/V tiles), so 8 programs per SM is
    two to four real waves: the last, ragged wave then costs a small fraction.
    Splitting more costs little beyond that: each split writes D + 1 floats per head,
    and an empty split (a sequence shorter than S tiles) only its lse.
    """
    if batch < 1 or kv_heads < 1 or num_sms < 1:
        raise ValueError(f"batch, kv_heads and num_sms must be >= 1, got {batch}, {kv_heads}, {num_sms}")
    wanted = math.ceil(waves * num_sms / (batch * kv_heads))
    return max(1, min(max_splits, wanted))


def make_workspace(
    batch: int, q_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> DecodeWorkspace:
    return DecodeWorkspace(
        partial_out=torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=device),
        partial_lse=torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=device),
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    return_lse: bool = False,
    config: KernelConfig = KernelConfig(),
    table_rows: torch.Tensor | None = None,
    table_start: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's one query token over its `seqused_k[i]` keys.

    q `[B, Hq, D]`; k_cache, v_cache `[slots, Hkv, D]` (Hq a multiple of Hkv);
    page_table `[B, W]` int32 or int64 (row i's first seqused_k[i] entries are its
    slots), or with `table_rows` `[B]` any `[R, W]` table read in place: sequence i's
    slots are `page_table[table_rows[i], table_start[i]:]` (`table_start` `[B]`, or 0);
    seqused_k `[B]` int32. Returns out `[B, Hq, D]` in q's dtype, and with
    `return_lse` also lse `[Hq, B]` float32, natural log, -inf for a sequence with no
    keys (whose output is 0): the layout cascade.merge_states takes.

    An fp8 cache: k_cache, v_cache float8_e4m3fn with `k_scale`, `v_scale` float32 `[Hkv]`
    on their device (real key = stored.float() * k_scale[h]); q stays bf16, fp16 or fp32
    and out takes its dtype. Other caches share q's dtype and take no scales.
    """
    batch = _check_inputs(q, k_cache, v_cache, page_table, seqused_k, num_splits, config, table_rows, table_start)
    scales = check_kv_scales(k_cache, k_scale, v_scale)
    out, lse, workspace = prepare_outputs(q, out, workspace, return_lse, num_splits)
    if batch > 0:
        _launch(q, k_cache, v_cache, TableRef.of(page_table, seqused_k, table_rows, table_start), seqused_k, scale,
                num_splits, out, lse, workspace, config, scales)
    return out if lse is None else (out, lse)  # lse is None unless return_lse


class TableRef(NamedTuple):
    """A page table as kernel arguments: the table, the row and start pointers (seqused_k
    stands in for those a gathered table does not use) and the two constexpr flags."""

    table: torch.Tensor
    rows: torch.Tensor
    start: torch.Tensor
    indirect: bool
    offset: bool

    @classmethod
    def of(
        cls, table: torch.Tensor, seqused_k: torch.Tensor, rows: torch.Tensor | None, start: torch.Tensor | None
    ) -> TableRef:
        return cls(
            table, seqused_k if rows is None else rows, seqused_k if start is None else start,
            rows is not None, start is not None,
        )


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: TableRef,
    seqused_k: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    workspace: DecodeWorkspace | None,
    config: KernelConfig,
    scales: KVScales | None,
) -> None:
    """The split kernel, then (S > 1) the merge."""
    kv_heads = k_cache.shape[1]
    group = q.shape[1] // kv_heads
    launch_split(
        "split_kv_kernel", (kv_heads, num_splits, q.shape[0]), (seqused_k,), (num_splits,),
        q, k_cache, v_cache, table, scale, out, KernelOutputs.of(out, lse, workspace), num_splits, config, scales,
        GROUP=group,
        BLOCK_H=max(16, next_pow2(group)),  # tl.dot needs 16 rows; rows >= G are padding
    )


def launch_split(
    kernel_name: str,
    grid: tuple[int, int, int],
    lengths: tuple[torch.Tensor, ...],
    scalars: tuple[int, ...],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: TableRef,
    scale: float,
    out: torch.Tensor,
    dest: KernelOutputs,
    num_splits: int,
    config: TileConfig,
    scales: KVScales | None,
    **constexprs: object,
) -> None:
    """Launch a split kernel of triton_decode_kernels (decode or group), then (S > 1) the
    merge over every row of `out`.

    Both take one argument layout: Q, K, V, the page table, `lengths` (seqused_k, and the
    group kernel's cu_seqlens_q), the table's row and start pointers, the four outputs,
    the K and V scales (an fp8 cache; else seqused_k stands in, never read), the softmax
    scale, `scalars` (ending with num_splits), the strides, the shared constexprs;
    `constexprs` holds each kernel's own (GROUP and its tile rows)."""
    kernels = load_kernels()
    head_dim = q.shape[2]
    direct = num_splits == 1
    k_scale, v_scale = (lengths[0], lengths[0]) if scales is None else scales
    getattr(kernels, kernel_name)[grid](
        q, k_cache, v_cache, table.table, *lengths, table.rows, table.start,
        dest.part_out, dest.part_lse, out, dest.lse,
        k_scale, v_scale,
        scale * LOG2E,
        *scalars,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        table.table.stride(0),
        *dest.part_strides,
        out.stride(0), out.stride(1),
        *dest.lse_strides,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_N=config.block_n,
        DIRECT=direct,
        WRITE_LSE=dest.write_lse,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INDIRECT=table.indirect,
        OFFSET=table.offset,
        KV_FP8=scales is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **constexprs,
    )
    if not direct:
        launch_merge(kernels, dest, out, num_splits)


class KernelOutputs(NamedTuple):
    """Where a split kernel writes, as its pointer arguments and strides. With S == 1 the
    partials are unused: `out` stands in as their pointer, with zero strides; so does it
    for lse when no lse is wanted."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    part_strides: tuple[int, ...]  # partial_out's first three, partial_lse's first two
    lse: torch.Tensor
    lse_strides: tuple[int, int]
    write_lse: bool

    @classmethod
    def of(cls, out: torch.Tensor, lse: torch.Tensor | None, workspace: DecodeWorkspace | None) -> KernelOutputs:
        part_strides: tuple[int, ...]
        if workspace is None:
            part_out, part_lse, part_strides = out, out, (0,) * 5
        else:
            part_out, part_lse = workspace
            part_strides = (*part_out.stride()[:3], *part_lse.stride()[:2])
        lse_ptr, lse_strides = (out, (0, 0)) if lse is None else (lse, (lse.stride(0), lse.stride(1)))
        return cls(part_out, part_lse, part_strides, lse_ptr, lse_strides, lse is not None)


def launch_merge(kernels: ModuleType, dest: KernelOutputs, out: torch.Tensor, num_splits: int) -> None:
    """The merge kernel over every row of `out` `[rows, Hq, D]` (and of lse, if wanted)."""
    rows, q_heads, head_dim = out.shape
    block_d = next_pow2(head_dim)
    kernels.merge_splits_kernel[(q_heads, rows)](
        dest.part_out, dest.part_lse, out, dest.lse,
        num_splits,
        *dest.part_strides,
        out.stride(0), out.stride(1),
        *dest.lse_strides,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=next_pow2(num_splits),
        WRITE_LSE=dest.write_lse,
        num_warps=4 if block_d >= 128 else 2,
    )


def prepare_outputs(
    q: torch.Tensor, out: torch.Tensor | None, workspace: DecodeWorkspace | None, return_lse: bool, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor | None, DecodeWorkspace | None]:
    """out `[rows, Hq, D]` (checked, or allocated like q), lse `[Hq, rows]` (or None) and the
    workspace (checked, or allocated; None with one split)."""
    rows, q_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with unit last stride, got {tuple(out.shape)} {out.dtype}"
        )
    lse = torch.empty(q_heads, rows, dtype=torch.float32, device=q.device) if return_lse else None
    if num_splits == 1:
        return out, lse, None
    if workspace is None:
        workspace = make_workspace(rows, q_heads, head_dim, num_splits, q.device)
    check_workspace(workspace, rows, q_heads, head_dim, num_splits)
    return out, lse, workspace


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    num_splits: int,
    config: KernelConfig,
    table_rows: torch.Tensor | None = None,
    table_start: torch.Tensor | None = None,
) -> int:
    """Shape, dtype and layout checks (host metadata only: no device sync); the batch size."""
    batch = check_qkv(q, k_cache, v_cache, "B")
    check_table(page_table, seqused_k, batch, "B", table_rows, table_start)
    check_tiling(num_splits, config.block_n)
    return batch


def check_qkv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: str) -> int:
    """q `[rows, Hq, D]` against the pool `[slots, Hkv, D]`: shapes, dtypes, unit strides on D,
    and at most MAX_GRID_YZ rows. Returns q's row count."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be [{rows}, Hq, D] and k_cache, v_cache one [slots, Hkv, D] shape, got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    _, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim or q_heads % kv_heads != 0:
        raise ValueError(f"q heads {q_heads} must be a multiple of KV heads {kv_heads}, with equal head_dim")
    if k_cache.dtype == v_cache.dtype == FP8:
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"q must be bfloat16, float16 or float32 over an fp8 cache, got {q.dtype}")
    elif not (k_cache.dtype == v_cache.dtype == q.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share a dtype (or k_cache, v_cache both {FP8}), got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if min(q.stride(-1), k_cache.stride(-1), v_cache.stride(-1)) != 1:
        raise ValueError("q, k_cache and v_cache need a unit stride on head_dim")
    if q.shape[0] > MAX_GRID_YZ:  # q's rows bound the grid's z dimension (sequences or row chunks)
        raise ValueError(f"q's rows {rows} must be at most {MAX_GRID_YZ} (a CUDA grid dimension), got {q.shape[0]}")
    return q.shape[0]


def check_table(
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    seqs: int,
    name: str,
    table_rows: torch.Tensor | None = None,
    table_start: torch.Tensor | None = None,
) -> None:
    """page_table int32 or int64 with unit column stride: `[seqs, W]`, or with `table_rows`
    `[seqs]` (and `table_start` `[seqs]`, only with rows) any `[R, W]` read through them;
    seqused_k `[seqs]` int32, contiguous."""
    if page_table.dtype not in (torch.int32, torch.int64) or page_table.dim() != 2:
        raise ValueError(f"page_table must be 2-D int32 or int64, got {tuple(page_table.shape)} {page_table.dtype}")
    if table_rows is None and page_table.shape[0] != seqs:
        raise ValueError(f"page_table must be [{name}={seqs}, W], got {tuple(page_table.shape)}")
    if table_start is not None and table_rows is None:
        raise ValueError("table_start needs table_rows")
    for field, index in (("table_rows", table_rows), ("table_start", table_start)):
        if index is not None and (
            index.dtype not in (torch.int32, torch.int64) or index.shape != (seqs,) or not index.is_contiguous()
        ):
            raise ValueError(
                f"{field} must be [{name}={seqs}] int32 or int64, contiguous, got {tuple(index.shape)} {index.dtype}"
            )
    if page_table.stride(1) != 1:
        raise ValueError("page_table needs a unit stride on its columns")
    if seqused_k.dtype != torch.int32 or seqused_k.shape != (seqs,) or not seqused_k.is_contiguous():
        raise ValueError(
            f"seqused_k must be [{name}={seqs}] int32, contiguous, got {tuple(seqused_k.shape)} {seqused_k.dtype}"
        )


class KVScales(NamedTuple):
    """The dequantization scales of an fp8 cache: real = stored.float() * scale[h]."""

    k_scale: torch.Tensor  # [Hkv] float32, unit stride, on the cache's device
    v_scale: torch.Tensor


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> KVScales | None:
    """The scales an fp8 cache needs (`[Hkv]` float32 on its device), or None for another
    cache, which takes none. A scale with a non-unit stride (a per-tensor scale expanded
    to every head) is copied to a contiguous one. Host metadata only: no device sync."""
    if k_cache.dtype != FP8:
        for name, given in (("k_scale", k_scale), ("v_scale", v_scale)):
            if given is not None:
                raise ValueError(f"{name} is for an {FP8} cache; this cache is {k_cache.dtype}")
        return None
    kv_heads = k_cache.shape[1]
    checked = []
    for name, given in (("k_scale", k_scale), ("v_scale", v_scale)):
        if given is None:
            raise ValueError(f"an {FP8} cache needs {name} (float32 [Hkv={kv_heads}])")
        if given.dtype != torch.float32 or given.shape != (kv_heads,) or given.device != k_cache.device:
            raise ValueError(
                f"{name} must be float32 [Hkv={kv_heads}] on {k_cache.device}, got "
                f"{given.dtype} {tuple(given.shape)} on {given.device}"
            )
        checked.append(given if given.stride(0) == 1 else given.contiguous())
    if k_cache.is_cuda and _capability(k_cache.device) < (8, 9):
        raise ValueError(f"an {FP8} cache needs a GPU of compute capability 8.9 or newer (Triton's fp8e4nv)")
    return KVScales(*checked)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def check_tiling(num_splits: int, block_n: int) -> None:
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"config.block_n must be a power of two >= 16, got {block_n}")


def check_workspace(ws: DecodeWorkspace, batch: int, q_heads: int, head_dim: int, num_splits: int) -> None:
    po, pl = ws
    ok = (
        po.dtype == pl.dtype == torch.float32
        and po.dim() == 4 and po.shape[0] >= batch and po.shape[1:] == (q_heads, num_splits, head_dim)
        and pl.dim() == 3 and pl.shape[0] >= batch and pl.shape[1:] == (q_heads, num_splits)
        and po.stride(-1) == 1 and pl.stride(-1) == 1
    )
    if not ok:
        raise ValueError(
            f"workspace must be float32 [>= {batch}, {q_heads}, {num_splits}, {head_dim}] and "
            f"[>= {batch}, {q_heads}, {num_splits}], got {tuple(po.shape)} and {tuple(pl.shape)}"
        )
