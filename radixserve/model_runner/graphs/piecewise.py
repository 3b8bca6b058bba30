"""CUDA graphs for prefill and mixed steps: the model between attention calls, captured per token bucket.

A step that prefills (a prompt chunk, alone or with decodes) runs eagerly: its
attention metadata depends on every sequence's lengths, so the whole forward
cannot be one graph the way a decode step is (decode.py). Eagerly, though,
the host launches the model several times slower than the GPU runs it (~1,700
Python calls a layer: module dispatch, torch.compile guards, FA4's interface;
`benchmarks/mixed_step.py` times it), and under a server's steady arrivals
most steps prefill something.

Everything but attention is position-wise (each row computed on its own), so
it does not care how rows group into sequences. A dense decoder of L layers is
captured as L + 1 pieces per bucket of rows (largest first, one memory pool):

    piece 0      ids -> embedding -> layer 0 before attention (norm, qkv, q/k norm, RoPE)
    piece i      layer i-1 after attention (o_proj, norm, MLP) -> layer i before attention
    piece L      layer L-1 after attention -> final norm -> hidden

and a step of n <= the largest bucket rows runs in the smallest bucket bs >= n:
replay piece 0, then per layer the eager attention (K/V write, the backend's
call over the prepared metadata, folding's index maps) on the first n rows of
the static q/k/v, its output copied into the static attention buffer, then the
next piece. Logits, pooled states and scores come from the first n rows of the
static hidden buffer, eagerly.

Static buffers (shared by every bucket, the first bs rows): ids, positions,
q/k/v, attention output, residual stream, hidden. Rows n..bs hold what earlier
steps left there (valid token ids and positions, finite activations): padding
rows are computed and never read, and rows never mix in a piece. Each piece
copies its outputs into the static buffers, so nothing computed inside a graph
outlives it and every piece reuses the pool.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.graphs.parts import GraphParts, unsupported_reason
from radixserve.model_runner.models.decoder import AttentionFn, DecoderLayer

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # a private name: for typing only


logger = logging.getLogger(__name__)

# Rows of a step (prefill chunk tokens + decodes, after folding). Padding costs the
# position-wise work of its rows (matmuls mostly); the spacing keeps it under ~25% past 1,024.
BUCKETS = (
    16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120,
    6144, 7168, 8192, 10240, 12288, 14336, 16384,
)

# The default cap of `EngineConfig.piecewise_max_rows`: steps of more rows run eagerly, since
# past it replaying pieces measured slower than the eager forward on the H100 (docs/gpu.md).
MAX_ROWS = 8192


def piecewise_buckets(max_rows: int) -> list[int]:
    """The row counts captured: BUCKETS below `max_rows`, and `max_rows` itself."""
    return sorted({b for b in BUCKETS if b < max_rows} | {max_rows})


class PiecewiseGraphRunner:
    """Captures and replays the pieces of a runner's dense model for eager (non-decode) steps."""

    def __init__(self, parts: GraphParts, max_rows: int) -> None:
        reason = unsupported_reason(parts)
        if reason is not None:
            raise ValueError(reason)
        self.model = parts.model
        self.device = parts.device
        self.buckets = piecewise_buckets(max_rows)
        cfg, dev, dtype = parts.model_config, parts.device, parts.dtype
        top = self.buckets[-1]
        self._ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self._positions = torch.zeros(top, dtype=torch.int64, device=dev)
        # This rank's heads (all of them without tensor parallelism).
        self._q = torch.zeros(top, parts.model.local_heads, cfg.head_dim, dtype=dtype, device=dev)
        self._k = torch.zeros(top, parts.model.local_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
        self._v = torch.zeros_like(self._k)
        self._attn = torch.zeros_like(self._q)
        self._residual = torch.zeros(top, cfg.hidden_size, dtype=dtype, device=dev)
        self._hidden = torch.zeros_like(self._residual)
        self._stream = torch.cuda.Stream(dev)
        self._pool: _POOL_HANDLE | None = None  # set by the first capture (the largest bucket)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        for bs in reversed(self.buckets):  # largest first: smaller buckets reuse its pool
            self._capture(bs)
        torch.cuda.synchronize(dev)
        logger.info("captured piecewise CUDA graphs (%d pieces) for row counts %s",
                    len(self.model.layers) + 1, self.buckets)

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.input_ids.shape[0] <= self.max_rows

    def _piece(self, i: int, bs: int) -> None:
        """Piece i on the first bs rows of the static buffers (see the module docstring)."""
        model = self.model
        layers = cast(Sequence[DecoderLayer], model.layers)  # a ModuleList: its items read as nn.Module
        if i == 0:
            x, residual = model.embed(self._ids[:bs]), None
        else:
            x, residual = layers[i - 1].after_attention(self._attn[:bs], self._residual[:bs])
        if i == len(layers):
            self._hidden[:bs].copy_(model.final_norm(x, residual))
            return
        q, k, v, residual = layers[i].before_attention(x, residual, self._positions[:bs], model.rotary)
        self._q[:bs].copy_(q)
        self._k[:bs].copy_(k)
        self._v[:bs].copy_(v)
        self._residual[:bs].copy_(residual)

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        pieces = len(self.model.layers) + 1
        stream, current = self._stream, torch.cuda.current_stream(self.device)
        # Warm up outside the capture, on the capture stream: torch.compile and cuBLAS
        # pick their kernels for a new size on first use, and nothing may do that in a capture.
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for i in range(pieces):
                self._piece(i, bs)
        current.wait_stream(stream)
        graphs = []
        for i in range(pieces):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                self._piece(i, bs)
            self._pool = graph.pool()
            graphs.append(graph)
        self._graphs[bs] = graphs

    def run(self, batch: ForwardBatch, attn: AttentionFn) -> torch.Tensor:
        """Hidden states `[n, H]` of the batch's n rows (`can_run`; its inputs resolved and on
        the device, the backend prepared): a view of a static buffer, valid until the next run."""
        n = batch.input_ids.shape[0]
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        self._ids[:n].copy_(batch.input_ids)
        self._positions[:n].copy_(batch.positions)
        graphs = self._graphs[bs]
        q, k, v, out = self._q[:n], self._k[:n], self._v[:n], self._attn[:n]
        for layer, graph in enumerate(graphs[:-1]):
            graph.replay()
            out.copy_(attn(layer, q, k, v))
        graphs[-1].replay()
        return self._hidden[:n]
