"""The model runner: weights, KV pool and attention backend; one forward per batch.

It knows nothing of requests' lifecycles: the scheduler hands it a
`ForwardBatch` (tokens, positions, slots) and gets logits back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from radixserve.model_runner.attention import create_backend
from radixserve.model_runner.config import DTYPES, RunnerConfig
from radixserve.model_runner.cpu_threads import StepThreads
from radixserve.model_runner.forward_batch import (
    CascadePlan,
    ForwardBatch,
    ForwardOutput,
    SampleOutput,
    SamplingRow,
    ScoreOutput,
    resolve_inputs,
)
from radixserve.model_runner.graphs import MAX_ROWS as PIECEWISE_MAX_ROWS
from radixserve.model_runner.graphs import DecodeGraphRunner, GraphParts, PiecewiseGraphRunner, unsupported_reason
from radixserve.model_runner.kv_pool import FP8_KV_DTYPE, KVPool, KVScales, ReqToTokenPool, SlotAllocator
from radixserve.model_runner.kv_scales import load_kv_scales
from radixserve.model_runner.loader import load_model, weight_files
from radixserve.model_runner.models.cpu_linear import packing_supported
from radixserve.model_runner.models.kernels import compile_unsupported_reason, compiled_kernels
from radixserve.model_runner.parallel import TPComm
from radixserve.model_runner.sampler import SamplingBatch, TokenBitmask, sample
from radixserve.sampling_params import SamplingParams, top_count

logger = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
CPU_DEFAULT_KV_TOKENS = 16384
# Scored rows' logprobs are computed in blocks of at most this many floats (128 MiB in fp32):
# 4,096 rows of a 32k vocabulary, 221 rows of Qwen3's 151,936.
SCORE_BLOCK_ELEMENTS = 1 << 25


class ModelRunner:
    """With `comm` (tensor parallelism) the runner holds its rank's share of the model and a KV
    pool of its KV heads; every rank's runner is built in the same order and runs the same
    forwards (the collectives inside the model pair them up), and every rank's pool has the
    same slots (the fewest any rank can hold)."""

    def __init__(
        self, model_path: str | Path, *, device: torch.device, dtype: torch.dtype, config: RunnerConfig,
        comm: TPComm | None = None,
    ) -> None:
        self.config = config
        self.comm = comm
        cuda_graphs, piecewise_graphs = config.cuda_graphs, config.piecewise_graphs
        max_running_requests, max_context = config.max_running_requests, config.max_context
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got device {str(device)!r}")
        self.device = device
        self.dtype = dtype
        self.model, self.model_config = load_model(
            model_path, device, dtype, progress=config.show_progress, moe_backend=config.moe_backend, comm=comm
        )
        cfg = self.model_config
        self._set_kernels(config.fused_kernels)
        if packing_supported(device, dtype):  # decode-sized matmuls through oneDNN (models/cpu_linear.py)
            self.model.pack_cpu_weights()
        model_max = cfg.max_position_embeddings
        if max_context is not None and max_context > model_max:
            raise ValueError(f"max_context {max_context} exceeds the model's max_position_embeddings {model_max}")
        self.max_context = max_context or model_max
        self.kv_dtype = FP8_KV_DTYPE if config.kv_cache_dtype == "fp8_e4m3" else dtype
        num_slots = config.kv_cache_tokens or self._default_kv_tokens(config.gpu_memory_utilization)
        if comm is not None:  # one allocator (rank 0's) hands out slots that every rank must hold
            num_slots = comm.min_int(num_slots)
        self.pool = KVPool(cfg.num_layers, num_slots, self.model.local_kv_heads, cfg.head_dim, dtype, device,
                           kv_dtype=self.kv_dtype, scales=self._kv_scales(model_path))
        self.allocator = SlotAllocator(num_slots)
        self.req_to_token = ReqToTokenPool(max_running_requests, self.max_context, device)
        self.backend = create_backend(config.attention_backend, device, dtype, cfg.head_dim, config.triton_decode,
                                      cascade=config.cascade_attention is not False, kv_dtype=self.kv_dtype)
        self.scale = cfg.softmax_scale
        # One process on the CPU: each forward's thread count by its rows (cpu_threads.py).
        # Tensor-parallel ranks share the host's CPUs at a fixed count (tp_worker.py).
        self.step_threads = StepThreads() if device.type == "cpu" and comm is None else None
        logger.info(
            "model %s on %s (%s): %d KV slots (%s), attention %s",
            cfg.architecture, device, dtype, num_slots, self.kv_dtype, self.backend.name,
        )
        # Decode batches of up to max_running_requests replay captured graphs (graphs/decode.py).
        # None: on wherever they are supported; True: required (a ValueError says why not).
        parts = GraphParts(self.model, cfg, self.backend, self.req_to_token.table, self.attention, device, dtype,
                           self.vocab_size)
        reason = unsupported_reason(parts)
        if cuda_graphs is None and reason is not None:
            logger.info("CUDA graphs off: %s", reason)
        use_graphs = cuda_graphs if cuda_graphs is not None else reason is None
        self.graphs = DecodeGraphRunner(parts, max_running_requests) if use_graphs else None
        self.graph_batches = 0  # forwards that replayed a captured graph (the rest ran eagerly)
        # Other steps (prefill, mixed) replay the model's pieces between attention calls
        # (graphs/piecewise.py), up to a step's most rows (a full prefill budget plus a decode
        # each), or `piecewise_max_rows` (default MAX_ROWS) where that is fewer.
        if piecewise_graphs and reason is not None:
            raise ValueError(f"piecewise_graphs=True: {reason}")
        use_pieces = piecewise_graphs if piecewise_graphs is not None else use_graphs
        cap = PIECEWISE_MAX_ROWS if config.piecewise_max_rows is None else config.piecewise_max_rows
        max_rows = min(config.max_prefill_tokens + max_running_requests, cap)
        self.pieces = PiecewiseGraphRunner(parts, max_rows) if use_pieces else None
        self.piecewise_batches = 0  # forwards that replayed graph pieces

    def _kv_scales(self, model_path: str | Path) -> KVScales | None:
        """An fp8 pool's scales from the checkpoint, for this rank's KV heads (None: it stores
        none, and the pool takes 1.0). A model-dtype pool ignores them: they are not read."""
        if self.kv_dtype != FP8_KV_DTYPE:
            return None
        cfg = self.model_config
        first, count = self.model.shard.kv_heads(cfg)
        scales = load_kv_scales(weight_files(Path(model_path)), cfg.num_layers, cfg.num_kv_heads, first, count)
        logger.info("fp8 KV cache scales: %s", "from the checkpoint" if scales is not None else "1.0 (none stored)")
        return scales

    def _set_kernels(self, fused: bool | None) -> None:
        """Fused (torch.compile) position-wise kernels. None: on for CUDA devices where they
        can run (on the CPU compiling costs more than it saves); True: required."""
        reason = compile_unsupported_reason(self.device)
        if fused and reason is not None:
            raise ValueError(f"fused_kernels=True: {reason}")
        if fused is None:
            fused = self.device.type == "cuda" and reason is None
        if fused:
            self.model.use_kernels(compiled_kernels())
        logger.info("position-wise kernels: %s", "fused (torch.compile)" if self.model.kernels.compiled else "eager")

    def _default_kv_tokens(self, utilization: float) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_TOKENS
        cfg = self.model_config
        free, total = torch.cuda.mem_get_info(self.device)
        # Keep (1 - utilization) of the card for activations, graphs and the allocator.
        budget = free - (1.0 - utilization) * total
        slots = KVPool.slots_for(budget, cfg.num_layers, self.model.local_kv_heads, cfg.head_dim, self.kv_dtype)
        if slots < 1024:
            raise ValueError(
                f"too little GPU memory for the KV cache: {budget / 2**30:.2f} GiB gives {slots} slots; "
                "raise gpu_memory_utilization or set kv_cache_tokens"
            )
        return slots

    def warm_up(self, cascade_min_prefix: int) -> None:
        """First-use compiles at start, on CUDA, not in the middle of serving: the eager
        attention's shape classes, then one whole eager step with sampling. What the
        backend compiles after this stalls serving (fa4 counts and logs it)."""
        if self.device.type != "cuda":
            return
        self._warm_up_attention(cascade_min_prefix)
        self._warm_up_step()
        torch.cuda.synchronize(self.device)
        self.backend.finish_warm_up()

    @torch.inference_mode()
    def _warm_up_attention(self, cascade_min_prefix: int) -> None:
        """Run one layer's eager attention once per shape class an eager step can meet, so a
        backend that compiles a kernel variant per class (FA4 keys on causal or not, LSE or
        not, one query tile per sequence or more, batches past 256) compiles it now, not in
        the middle of serving (a compile stalls a step for seconds). Decode shapes under CUDA graphs are
        warmed by their capture; this covers prefill and mixed steps, and cascades with
        `cascade_min_prefix` > 0. Reads whatever the pool and the table hold; writes nothing.

        A short chunk (2 rows) is a class of its own: with the Triton decode kernel serving
        one-row steps, nothing else reaches FA4 with a single query tile per sequence (a
        lone short request on a fresh server would compile it)."""
        cfg = self.model_config
        prefix = max(cascade_min_prefix, 256)
        longest = 512  # a prefill chunk's query rows: more than one query tile
        if prefix + longest > self.max_context:
            prefix, longest = self.max_context // 2, self.max_context // 4
        for n in sorted({1, min(2, self.req_to_token.max_requests), self.req_to_token.max_requests}):
            for first in (1, 2, longest):
                extend = [first] + [1] * (n - 1)
                plans: list[CascadePlan | None] = [None]
                if cascade_min_prefix > 0 and n > 1:
                    sizes = [2] * (n // 2) + [1] * (n % 2)
                    plans.append(CascadePlan(sizes, [prefix] * (n // 2) + [0] * (n % 2)))
                for plan in plans:
                    batch = ForwardBatch(
                        input_ids=torch.empty(0, dtype=torch.int64),
                        positions=torch.empty(0, dtype=torch.int64),
                        out_slots=torch.empty(0, dtype=torch.int64),
                        req_rows=list(range(n)),
                        prefix_lens=[prefix] * n,
                        extend_lens=extend,
                        logits_rows=torch.empty(0, dtype=torch.int64),
                        cascade=plan,
                    )
                    q = torch.randn(sum(extend), self.model.local_heads, cfg.head_dim, dtype=self.dtype,
                                    device=self.device)
                    self.backend.prepare(batch, self.req_to_token.table)
                    k_scale, v_scale = self.pool.scales(0)
                    self.backend.attend(q, self.pool.k[0], self.pool.v[0], self.scale, k_scale=k_scale,
                                        v_scale=v_scale)

    @torch.inference_mode()
    def _warm_up_step(self) -> None:
        """One eager step of a lone 16-token sequence, then a sampling pass (a greedy row and a
        sampled one): first-use compiles (the fused kernels for eager shapes, the sampler's
        Triton kernel) land here, not in a server's first request. Its K/V go to the dummy
        slot 0 and it reads table row 0, which no request holds yet."""
        n = 16
        batch = ForwardBatch(
            input_ids=torch.zeros(n, dtype=torch.int64),
            positions=torch.arange(n, dtype=torch.int64),
            out_slots=torch.zeros(n, dtype=torch.int64),
            req_rows=[0],
            prefix_lens=[0],
            extend_lens=[n],
            logits_rows=torch.tensor([n - 1, n - 1], dtype=torch.int64),
        )
        # Both paths of a step that prefills: the model's eager forward (steps past the graph
        # pieces' largest bucket; it compiles apart from the captured pieces), then the pieces.
        pieces, self.pieces = self.pieces, None
        try:
            logits = self.forward(batch).logits
        finally:
            self.pieces = pieces
        if pieces is not None:
            logits = self.forward(batch).logits
        rows = [
            SamplingRow(params=params, token_history=(), output_ids=(), seed=0, step=0)
            for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=20, top_p=0.9))
        ]
        self.sample(logits, SamplingBatch.build(rows, self.vocab_size, self.device))

    def release_memory(self) -> None:
        """Drop the KV pool, graphs and weights (the engine shut down): a later engine in
        this process can size its pool from the memory they held."""
        self.graphs = self.pieces = None
        self.pool.k, self.pool.v = [], []
        self.backend.release()
        self.model = None  # type: ignore[assignment]  # released: the runner serves no call after this
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> ForwardOutput:
        """Write the batch's K/V into the pool; return logits, hidden states and scores asked for.

        With CUDA graphs, a decode batch's logits are valid until the next forward."""
        if self.graphs is not None and self.graphs.can_run(batch):
            self.graph_batches += 1
            return ForwardOutput(self.graphs.run(batch), None, None)
        batch = batch.to(self.device)
        if self.step_threads is not None:
            self.step_threads.apply(int(batch.input_ids.shape[0]))
        if batch.sourced is not None:
            assert batch.input_source is not None, "sourced ids come with their source"
            resolve_inputs(batch.input_ids, batch.sourced, batch.input_source)
        self.backend.prepare(batch, self.req_to_token.table)
        attn = self.attention(batch.out_slots, batch.unfold, batch.fold)
        if self.pieces is not None and self.pieces.can_run(batch):
            self.piecewise_batches += 1
            hidden = self.pieces.run(batch, attn)
        else:
            hidden = self.model(batch.input_ids, batch.positions, attn)
        logits = self._logits(hidden, batch.logits_rows)
        pooled = None if batch.hidden_rows is None else hidden[batch.hidden_rows].float()
        scores = None
        if batch.score_rows is not None:
            assert batch.score_targets is not None, "score rows come with their targets"
            scores = self._scores(hidden, batch.score_rows, batch.score_targets, batch.score_top)
        return ForwardOutput(logits, pooled, scores)

    def _scores(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, top: int | None) -> ScoreOutput:
        """Each row's fp32 log_softmax over the vocabulary, reduced to what was asked (the target's
        logprob; with `top` its rank and the top k), a block of rows at a time: a long prompt's
        [rows, vocab] logprobs never exist at once (SCORE_BLOCK_ELEMENTS floats at most, and at
        least one row)."""
        k = None if top is None else top_count(top, self.vocab_size)
        step = max(1, SCORE_BLOCK_ELEMENTS // self.vocab_size)
        parts: list[tuple[torch.Tensor, ...]] = []
        for a in range(0, int(rows.numel()), step):
            logp = torch.log_softmax(self._logits(hidden, rows[a : a + step]).float(), dim=-1)
            target = targets[a : a + step].unsqueeze(1)
            chosen = logp.gather(1, target)
            if k is None:
                parts.append((chosen.squeeze(1),))
                continue
            ranks = (logp >= chosen).sum(dim=1)  # vLLM's rank: ties count against the target
            if k == 0:
                parts.append((chosen.squeeze(1), ranks))
                continue
            top_lp, top_ids = logp.topk(k, dim=-1, sorted=True)
            parts.append((chosen.squeeze(1), ranks, top_ids, top_lp))
        if not parts:
            empty = hidden.new_empty(0, dtype=torch.float32)
            return ScoreOutput(empty, None, None, None)
        columns: list[torch.Tensor | None] = [torch.cat(c) for c in zip(*parts)]
        columns += [None] * (4 - len(columns))
        first = columns[0]
        assert first is not None, "every block holds the targets' logprobs"
        return ScoreOutput(first, columns[1], columns[2], columns[3])

    def attention(
        self, slots: torch.Tensor, unfold: torch.Tensor | None = None, fold: torch.Tensor | None = None
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-layer attention of one batch (its backend is prepared): write the layer's
        new K/V at `slots`, attend over the pool."""
        pool, backend, scale = self.pool, self.backend, self.scale

        def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if unfold is not None:  # mlp fold: attention runs on every sequence's tokens
                q, k, v = q[unfold], k[unfold], v[unfold]
            pool.write(layer, slots, k, v)
            k_scale, v_scale = pool.scales(layer)  # fp8 pool: fixed device tensors (graph-safe)
            out = backend.attend(q, pool.k[layer], pool.v[layer], scale, k_scale=k_scale, v_scale=v_scale)
            return out if fold is None else out[fold]

        return attn

    def _logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() == 0:
            return hidden.new_empty((0, self.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch, bitmask: TokenBitmask | None = None) -> SampleOutput:
        return sample(logits, batch, bitmask)

    def to_host(self, out: SampleOutput) -> HostSample:
        """Start copying a sample to the host without waiting for it (pinned memory, an
        event): the host can schedule the next step while the GPU finishes this one."""
        if self.device.type != "cuda":
            return HostSample(out, out, None)

        def pinned(t: torch.Tensor) -> torch.Tensor:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            return buf

        def maybe(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else pinned(t)

        host = SampleOutput(pinned(out.token_ids), maybe(out.logprobs), maybe(out.top_ids), maybe(out.top_logprobs))
        done = torch.cuda.Event()
        done.record()
        return HostSample(out, host, done)


class HostSample(NamedTuple):
    """A sample on the device and its copy on the host, valid once `wait()` returns."""

    device: SampleOutput
    host: SampleOutput
    done: torch.cuda.Event | None

    def wait(self) -> SampleOutput:
        if self.done is not None:
            self.done.synchronize()
        return self.host
