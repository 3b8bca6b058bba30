"""Per-batch varlen metadata shared by the GPU backends, built once per batch on the device.

Layout (what FlashAttention's varlen kernels take), for B sequences and T new tokens:

    cu_seqlens_q  [B + 1] int32   q rows of sequence i are cu_seqlens_q[i] .. cu_seqlens_q[i + 1]
    seqused_k     [B]     int32   K/V tokens sequence i attends over (prefix + extend)
    page_table    [B, max_seqlen_k] int32   req_to_token rows; page size 1, so a page is a slot

Entries of `page_table` past `seqused_k[i]` are whatever the request table holds
there (stale slots of earlier requests, or 0): kernels never read them.

Indirect tables (`table_rows` set; the Triton kernels read them, FA4 does not):
`page_table` is then the request table itself, `[rows, max_context]` int64, and
sequence i's slots are `page_table[table_rows[i], table_start[i]:]` (start 0 when
`table_start` is None). A CUDA-graph decode step builds these instead of gathering
a `[B, max_context]` table every step (at 1,024 rows and a 40,960-token context,
~1 ms of gathers and casts per step on the H100).
Nothing here syncs with the host: the lengths come from the batch's host lists,
and the one host->device copy carries every per-sequence integer.
`decode_graph_metadata` builds the same layout for a captured decode step from
device tensors alone, with fixed host bounds (see graphs/decode.py).
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch

from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.transfer import to_device


class VarlenMetadata(NamedTuple):
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32, for backends that gather K/V contiguously
    page_table: torch.Tensor  # [B, max_seqlen_k] int32
    max_seqlen_q: int
    max_seqlen_k: int
    total_k: int  # sum of seq lens
    table_rows: torch.Tensor | None = None  # [B] int64: page_table is indirect (see above)
    table_start: torch.Tensor | None = None  # [B] int64 column offsets of an indirect table
    decode_rows: bool = False  # every q row is its own sequence's newest token (a decode step)


def build_varlen_metadata(batch: ForwardBatch, req_to_token: torch.Tensor) -> VarlenMetadata:
    """Metadata for `batch`; `req_to_token` is the `[rows, max_context]` int64 table on the device."""
    seq_lens = batch.seq_lens
    b = len(seq_lens)
    cu_q = list(accumulate(batch.extend_lens, initial=0))
    cu_k = list(accumulate(seq_lens, initial=0))
    # One host->device copy for every per-sequence integer (small copies cost more than their bytes).
    host = torch.tensor(cu_q + cu_k + seq_lens + list(batch.req_rows), dtype=torch.int32)
    dev = to_device(host, req_to_token.device)
    cu_seqlens_q = dev[: b + 1]
    cu_seqlens_k = dev[b + 1 : 2 * b + 2]
    seqused_k = dev[2 * b + 2 : 3 * b + 2]
    rows = dev[3 * b + 2 :].long()
    max_k = max(seq_lens)
    # Slice the columns first so the gather reads [B, max_k], never whole table rows.
    page_table = req_to_token[:, :max_k].index_select(0, rows).to(torch.int32)
    return VarlenMetadata(
        cu_seqlens_q=cu_seqlens_q,
        seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k,
        page_table=page_table,
        max_seqlen_q=max(batch.extend_lens),
        max_seqlen_k=max_k,
        total_k=cu_k[-1],
        decode_rows=max(batch.extend_lens) == 1,
    )


def decode_graph_metadata(
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    req_to_token: torch.Tensor,
    indirect: bool = False,
) -> VarlenMetadata:
    """Metadata of a decode batch (one new token per sequence) from device tensors only, so a
    CUDA graph can capture it: `req_rows`, `seq_lens` `[B]` int64 and `cu_seqlens_q` `[B + 1]`
    int32 (= arange) live in static buffers that each replay refills.

    No host value depends on the batch: `max_seqlen_k` is the table's width (a bound that
    covers every replay) and the page table is every row's whole `req_to_token` row,
    gathered, or with `indirect` the request table itself with `table_rows` (no copy).
    `total_k` is unknown on the host (-1): this metadata serves page-table kernels only.
    """
    seqused_k = seq_lens.to(torch.int32)
    return VarlenMetadata(
        cu_seqlens_q=cu_seqlens_q,
        seqused_k=seqused_k,
        cu_seqlens_k=cumulative_lens(seqused_k),
        page_table=req_to_token if indirect else req_to_token.index_select(0, req_rows).to(torch.int32),
        max_seqlen_q=1,
        max_seqlen_k=req_to_token.shape[1],
        total_k=-1,
        table_rows=req_rows if indirect else None,
        decode_rows=True,
    )


def cumulative_lens(lens: torch.Tensor) -> torch.Tensor:
    """[B + 1] int32 offsets `[0, l0, l0 + l1, ...]` of `[B]` lengths, on their device."""
    return torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


def flat_kv_slots(meta: VarlenMetadata) -> torch.Tensor:
    """[total_k] int64: every sequence's slot list, concatenated in batch order (no host sync).

    Position j of sequence i (j < seq_len_i) sits at `cu_seqlens_k[i] + j`, so
    `k_cache[flat_kv_slots(meta)]` is K laid out for a contiguous varlen call.
    """
    if meta.table_rows is not None:
        raise ValueError("flat_kv_slots needs a gathered page table, got an indirect one")
    device = meta.page_table.device
    b = meta.seqused_k.shape[0]
    seq_of = torch.repeat_interleave(
        torch.arange(b, device=device), meta.seqused_k.long(), output_size=meta.total_k
    )
    pos = torch.arange(meta.total_k, device=device) - meta.cu_seqlens_k.long()[seq_of]
    return meta.page_table[seq_of, pos].long()
