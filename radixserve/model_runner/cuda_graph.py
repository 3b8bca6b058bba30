"""CUDA graphs for decode steps: the model forward captured once per batch-size bucket.

A decode step is launch-bound (~1,500 kernel launches, 120-200 us of Python per
FA4 call; docs/gpu.md); replaying a captured graph launches the same kernels
for the cost of one call. A decode batch (every sequence extends by one token,
no folding, logits only) of n <= the largest bucket runs in the smallest bucket
bs >= n; anything else runs eagerly.

Static state, shared by every bucket (captured largest first into one memory pool):

    inputs        [5 * max_bs] int64  bucket bs reads its first 5 * bs entries as a [5, bs]
                                      block: input_ids, positions, out_slots, req_rows, seq_lens
    cu_seqlens_q  [max_bs + 1] int32  arange: one query row per sequence
    per bucket    the graph and its logits [bs, vocab] float32 (valid until the next replay)

Inside the graph the attention metadata is built from these buffers on the device
(`decode_graph_metadata`): page table = whole `req_to_token` rows, `max_seqlen_k` =
the table's width, so no host value depends on the batch.

Padding rows (n <= i < bs) are token 0 at position 0 of request row 0 with one
K/V token, writing their K/V to the dummy slot 0; their logits are dropped. Rows
never mix (norms and matmuls are per row, attention per sequence), so padding
cannot change a real row.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixserve.model_runner.attention.fa4_backend import FA4Attention, fa4_supports
from radixserve.model_runner.attention.metadata import decode_graph_metadata
from radixserve.model_runner.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from radixserve.model_runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Rows of the static input buffer, and what a padding row holds in each.
_IDS, _POS, _SLOTS, _ROWS, _LENS = range(5)
_PADDING = (0, 0, 0, 0, 1)
_PADDING_COLUMN = np.array(_PADDING, dtype=np.int64)[:, None]


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


def unsupported_reason(runner: ModelRunner) -> str | None:
    """Why decode graphs cannot run for this runner, or None when they can."""
    if runner.device.type != "cuda":
        return f"cuda_graphs needs a CUDA device, got device {str(runner.device)!r}"
    backend = runner.backend
    if not isinstance(backend, FA4Attention) or not fa4_supports(runner.dtype, runner.model_config.head_dim):
        return (
            "cuda_graphs needs the fa4 attention backend with a bfloat16/float16 model, "
            f"got backend {backend.name!r} with {runner.dtype}"
        )
    if getattr(runner.model, "moe_blocks", None) is not None and runner.model.moe_blocks():
        return "cuda_graphs does not support mixture-of-experts models (their routing syncs)"
    return None


class DecodeGraphRunner:
    """Captures and replays a runner's decode forward. Built after the runner's model, pool,
    request table and backend exist; `runner._attention(slots)` gives the per-layer attention."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        reason = unsupported_reason(runner)
        if reason is not None:
            raise ValueError(reason)
        self.runner = runner
        self.device = runner.device
        self.buckets = graph_buckets(max_batch)
        top = self.buckets[-1]
        # Flat, so that each bucket's [5, bs] block is contiguous (one plain copy fills it).
        self._inputs = torch.zeros(5 * top, dtype=torch.int64, device=self.device)
        self._host = torch.zeros(5 * top, dtype=torch.int64).pin_memory()
        self._host_array = self._host.numpy()  # the same pinned memory, for stage_inputs
        self._host_free = torch.cuda.Event()  # the last copy out of `_host` has finished
        self._host_free.record()
        self._cu_seqlens_q = torch.arange(top + 1, dtype=torch.int32, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

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

    def _body(self, bs: int) -> torch.Tensor:
        """The captured work: metadata on the device, the model, logits for every row."""
        runner = self.runner
        ids, pos, slots, rows, lens = self._inputs[: 5 * bs].view(5, bs)
        runner.backend.prepare_graph(
            decode_graph_metadata(rows, lens, self._cu_seqlens_q[: bs + 1], runner.req_to_token.table)
        )
        hidden = runner.model(ids, pos, runner._attention(slots))
        return runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        pool = None
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            self._inputs[: 5 * bs].view(5, bs).copy_(torch.tensor(_PADDING, device=self.device)[:, None])
            # Warm up outside the capture, on the capture stream: FA4 compiles each new
            # kernel variant on its first call, and nothing may compile inside a capture.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._body(bs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self._body(bs)
            pool = graph.pool()
            self._graphs[bs] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[len(batch.logits_rows), vocab]` float32 of a decode batch (`can_run`).

        The result may be a view of the graph's output: valid until the next replay."""
        n = batch.batch_size
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        # One host-to-device copy carries the whole bucket, padding included. The pinned
        # buffer is rewritten only once the previous copy out of it has finished.
        self._host_free.synchronize()
        stage_inputs(self._host_array[: 5 * bs].reshape(5, bs), batch)
        self._inputs[: 5 * bs].copy_(self._host[: 5 * bs], non_blocking=True)
        self._host_free.record()
        if batch.input_source is not None:  # ids are rows of the previous step's tokens
            ids = self._inputs[:n]
            ids.copy_(batch.input_source.index_select(0, ids))
        graph, logits = self._graphs[bs]
        graph.replay()
        rows = batch.logits_rows.cpu()
        if rows.numel() == n and torch.equal(rows, torch.arange(n)):
            return logits[:n]
        return logits.index_select(0, rows.to(self.device, non_blocking=True))
