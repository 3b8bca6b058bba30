"""CUDA graphs for decode steps: the model forward captured once per batch-size bucket.

A decode step is launch-bound (~1,500 kernel launches, 120-200 us of Python per
FA4 call; docs/gpu.md); replaying a captured graph launches the same kernels
for the cost of one call. A decode batch (every sequence extends by one token,
no folding, logits only) of n <= the largest bucket runs in the smallest bucket
bs >= n; anything else runs eagerly.

Two sets of graphs, each captured largest first into one memory pool: plain
decode steps (at start) and cascade decode steps (a batch with
`ForwardBatch.cascade`, attention/cascade.py; at start when the engine has
cascade attention on, else on first use). Static state per set:

    inputs        int64, one block per bucket bs, its first `width(bs)` entries:
                  plain    [5, bs]  input_ids, positions, out_slots, req_rows, seq_lens
                  cascade  [6, bs]  the same and shared_lens, then per group (padded
                           to bs groups) group_cu_q [bs + 1], group_rows [bs], group_prefix [bs]
    cu_seqlens_q  [max_bs + 1] int32  arange: one query row per sequence (shared)
    logits        [max_bs, vocab] float32, shared: a replay of bucket bs writes its first
                  bs rows (valid until the next replay)
    per bucket    the graph

Inside the graph the attention metadata is built from these buffers on the device
(`decode_graph_metadata`, `graph_cascade_metadata`): page tables are whole (or
offset) `req_to_token` rows (read in place through row indices by the Triton kernels,
gathered for FA4), `max_seqlen_k` the table's width, and a group holds
at most bs query rows, so no host value depends on the batch.

Padding rows (n <= i < bs) are token 0 at position 0 of request row 0 with one
K/V token, writing their K/V to the dummy slot 0; their logits are dropped. In
a cascade step they form one last group without a shared prefix. Rows never
mix (norms and matmuls are per row, attention per sequence or group of
sequences sharing a prefix), so padding cannot change a real row.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixserve.model_runner.attention.cascade import graph_cascade_metadata
from radixserve.model_runner.attention.metadata import decode_graph_metadata
from radixserve.model_runner.forward_batch import ForwardBatch, resolve_inputs
from radixserve.model_runner.graphs.parts import GraphParts, unsupported_reason
from radixserve.model_runner.transfer import to_device

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # a private name: for typing only


logger = logging.getLogger(__name__)

# A padding row attends over one token, so padding costs matmul rows only: coarser past 256.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
# Per-sequence rows of the static input block, and what a padding row holds in each.
_IDS, _POS, _SLOTS, _ROWS, _LENS, _SHARED = range(6)
_PADDING = (0, 0, 0, 0, 1, 0)
_PADDING_COLUMN = np.array(_PADDING[:5], dtype=np.int64)[:, None]  # stage_inputs' rows


def graph_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured: BUCKETS up to `max_batch`, and `max_batch` itself."""
    return sorted({b for b in BUCKETS if b < max_batch} | {max_batch})


def stage_inputs(host: np.ndarray, batch: ForwardBatch) -> None:
    """Write a decode batch's inputs into `host`, its bucket's [5, bs] block, padding after.

    Numpy on the block's memory, from views of the batch's tensors: a few microseconds,
    where each tensor op or list conversion would cost the host more. A decode batch's
    token i is sequence i's one token, at position prefix_lens[i]: the sequence lengths
    are the positions plus one."""
    n = batch.batch_size
    host[_IDS, :n] = batch.input_ids.numpy()
    host[_POS, :n] = batch.positions.numpy()
    host[_SLOTS, :n] = batch.out_slots.numpy()
    host[_ROWS, :n] = batch.req_rows
    np.add(host[_POS, :n], 1, out=host[_LENS, :n])
    host[:, n:] = _PADDING_COLUMN


class _GraphSet:
    """Captured graphs of one kind and their static inputs (one device block per bucket,
    filled by one host-to-device copy from a pinned buffer)."""

    def __init__(self, cascade: bool, top: int, device: torch.device) -> None:
        self.cascade = cascade
        self.per_seq = 6 if cascade else 5  # per-sequence rows of a block
        self.inputs = torch.zeros(self.width(top), dtype=torch.int64, device=device)
        self.host = torch.zeros(self.width(top), dtype=torch.int64).pin_memory()
        self.host_array = self.host.numpy()  # the same pinned memory, staged with numpy
        self.host_free = torch.cuda.Event()  # the last copy out of `host` has finished
        self.host_free.record()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: _POOL_HANDLE | None = None  # set by the first capture (the largest bucket)

    def width(self, bs: int) -> int:
        return self.per_seq * bs + (3 * bs + 1 if self.cascade else 0)

    def fill_padding(self, bs: int) -> None:
        """Every row of bucket bs a padding row (in one group without a prefix): capture input."""
        self.host_free.synchronize()
        host = self.host[: self.width(bs)]
        host.zero_()
        host[: self.per_seq * bs].view(self.per_seq, bs)[:] = torch.tensor(_PADDING[: self.per_seq])[:, None]
        if self.cascade:
            cu_q, _, _ = _group_views(host[self.per_seq * bs :], bs)
            cu_q[1:] = bs  # one group of every row, then empty ones
        self.inputs[: self.width(bs)].copy_(host)

    def fill(self, batch: ForwardBatch, bs: int) -> None:
        """Copy the batch (n <= bs sequences, padded) into bucket bs's block."""
        # The pinned buffer is rewritten only once the previous copy out of it has finished.
        self.host_free.synchronize()
        block = self.host_array[: self.width(bs)]
        stage_inputs(block[: 5 * bs].reshape(5, bs), batch)  # the first 5 rows of either layout
        if self.cascade:
            _stage_groups(block[5 * bs :], batch, bs)
        self.inputs[: self.width(bs)].copy_(self.host[: self.width(bs)], non_blocking=True)
        self.host_free.record()


def _stage_groups(block: np.ndarray, batch: ForwardBatch, bs: int) -> None:
    """A cascade block's rows after the first five: shared_lens [bs], then per group (padded
    to bs groups) group_cu_q [bs + 1], group_rows [bs], group_prefix [bs]."""
    plan, n = batch.cascade, batch.batch_size
    assert plan is not None, "a cascade block is staged for a batch with a cascade plan"
    shared = block[:bs]
    cu_q, rows, prefix = _group_views(block[bs:], bs)
    shared[:n] = plan.shared_lens
    shared[n:] = 0
    g = len(plan.group_sizes)
    cu_q[0] = 0
    np.cumsum(plan.group_sizes, out=cu_q[1 : g + 1])
    cu_q[g + 1 :] = bs  # the padding rows' group (if any), then empty groups
    rows[:] = 0
    rows[:g] = np.asarray(batch.req_rows)[cu_q[:g]]
    prefix[:] = 0
    prefix[:g] = plan.prefix_lens


def _group_views(groups, bs: int):
    """The per-group part of a cascade block (after its six per-sequence rows), numpy or
    torch alike: group_cu_q [bs + 1], group_rows [bs], group_prefix [bs]."""
    return groups[: bs + 1], groups[bs + 1 : 2 * bs + 1], groups[2 * bs + 1 : 3 * bs + 1]


class DecodeGraphRunner:
    """Captures and replays a runner's decode forward over its parts (model, request table,
    backend, and the per-layer attention that writes K/V into the pool)."""

    def __init__(self, parts: GraphParts, max_batch: int) -> None:
        reason = unsupported_reason(parts)
        if reason is not None:
            raise ValueError(reason)
        self.parts = parts
        self.device = parts.device
        self.buckets = graph_buckets(max_batch)
        top = self.buckets[-1]
        self._cu_seqlens_q = torch.arange(top + 1, dtype=torch.int32, device=self.device)
        # Every graph writes its logits here: one [top, vocab] buffer, not one per bucket and kind
        # (at 1,024 rows and a 152k vocabulary that is 0.6 GB against 8 GB).
        self._logits = torch.empty(top, parts.vocab_size, dtype=torch.float32, device=self.device)
        # One capture stream for every graph: the caching allocator reuses a block only on the
        # stream that freed it, so a stream per capture kept each bucket's memory to itself.
        self._stream = torch.cuda.Stream(self.device)
        self._plain = _GraphSet(False, top, self.device)
        self._cascade: _GraphSet | None = None  # see cascade_graphs
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            self._capture(self._plain, bs)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def cascade_graphs(self) -> _GraphSet:
        """The cascade decode graphs, captured for every bucket on the first call (the engine
        calls it at start when cascade attention is on; a capture mid-run stalls a step)."""
        if self._cascade is None:
            graphs = _GraphSet(True, self.max_batch, self.device)
            for bs in reversed(self.buckets):
                self._capture(graphs, bs)
            torch.cuda.synchronize(self.device)
            self._cascade = graphs
            logger.info("captured cascade decode CUDA graphs for batch sizes %s", self.buckets)
        return self._cascade

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.batch_size <= self.max_batch
            and batch.is_decode
            and batch.unfold is None
            and batch.fold is None
            and batch.hidden_rows is None
            and batch.score_rows is None
        )

    def _body(self, graphs: _GraphSet, bs: int) -> torch.Tensor:
        """The captured work: metadata on the device, the model, logits for every row."""
        parts = self.parts
        block = graphs.inputs[: graphs.width(bs)]
        seqs = block[: graphs.per_seq * bs].view(graphs.per_seq, bs)
        ids, pos, slots, rows, lens = seqs[:5]
        cu_q = self._cu_seqlens_q[: bs + 1]
        table = parts.table
        # The Triton kernels read the request table through row indices: no per-step gathers.
        indirect = parts.backend.triton_decode
        if graphs.cascade:
            group_cu_q, group_rows, group_prefix = _group_views(block[graphs.per_seq * bs :], bs)
            parts.backend.prepare_graph(None, graph_cascade_metadata(
                rows, lens, seqs[_SHARED], group_cu_q.to(torch.int32), group_rows, group_prefix, cu_q, table,
                indirect=indirect,
            ))
        else:
            parts.backend.prepare_graph(decode_graph_metadata(rows, lens, cu_q, table, indirect=indirect))
        hidden = parts.model(ids, pos, parts.attention(slots, None, None))
        return parts.model.compute_logits(hidden, out=self._logits[:bs])

    @torch.inference_mode()
    def _capture(self, graphs: _GraphSet, bs: int) -> None:
        graphs.fill_padding(bs)
        stream = self._stream
        # Warm up outside the capture, on the capture stream: FA4 compiles each new
        # kernel variant on its first call, and nothing may compile inside a capture.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._body(graphs, bs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graphs.pool, stream=stream):
            logits = self._body(graphs, bs)
        graphs.pool = graph.pool()
        graphs.graphs[bs] = (graph, logits)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[len(batch.logits_rows), vocab]` float32 of a decode batch (`can_run`).

        The result may be a view of the graph's output: valid until the next replay."""
        n = batch.batch_size
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        graphs = self._plain if batch.cascade is None else self.cascade_graphs()
        graphs.fill(batch, bs)
        if batch.sourced is not None:  # ids that are rows of the previous step's tokens
            assert batch.input_source is not None, "sourced ids come with their source"
            resolve_inputs(graphs.inputs[:n], batch.sourced, batch.input_source)
        graph, logits = graphs.graphs[bs]
        graph.replay()
        rows = batch.logits_rows.cpu()
        if rows.numel() == n and torch.equal(rows, torch.arange(n)):
            return logits[:n]
        return logits.index_select(0, to_device(rows, self.device))
