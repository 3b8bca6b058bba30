"""The Llama-family decoder (Llama, Qwen2, Qwen3) over a flat batch of tokens.

The model sees tokens, not sequences: `forward(input_ids [T], positions [T], attn)`
runs every layer on all T tokens at once and hands q/k/v to the caller's
`attn(layer_id, q, k, v)`, which stores k/v and attends within each sequence.

Weights: q/k/v are fused into one `qkv_proj` and gate/up into one
`gate_up_proj` (one matmul each instead of three/two). `checkpoint_layout()`
says which rows of which parameter every checkpoint tensor fills, so the
loader stays generic. Subclasses change the MLP of some layers through
`make_mlp` (Qwen3-MoE, in moe.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from radixserve.model_runner.kv_scales import is_kv_scale
from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.models.cpu_linear import pack_linears, pack_weight, packed_linear
from radixserve.model_runner.models.kernels import Kernels, UsesKernels
from radixserve.model_runner.models.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from radixserve.model_runner.models.parallel_layers import VocabParallelEmbedding, row_linear
from radixserve.model_runner.parallel import TPComm, TPShard

# attn(layer_id, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D], called once per
# layer in order. q and k are fresh contiguous tensors (normed, rotated); v is a view into the
# fused qkv output (last dim contiguous, token stride (Hq + 2 Hkv) * D): copy it if a kernel needs more.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Shard(NamedTuple):
    """The part of a checkpoint tensor one tensor-parallel rank reads: along dimension `dim`
    (of `full` entries), the `size` entries from each of `starts`, concatenated in order
    (two pieces for a stacked gate/up tensor: this rank's gate rows, then its up rows)."""

    dim: int
    starts: tuple[int, ...]
    size: int
    full: int


class WeightTarget(NamedTuple):
    """Where one checkpoint tensor goes: rows [row_start, row_start + rows) of `param`,
    or of `param[expert]` when `expert` is set (one expert's slice of a stacked [E, ...] weight).
    `shard`, with several tensor-parallel ranks, is the part of the tensor this rank reads."""

    param: str
    row_start: int
    rows: int
    expert: int | None = None
    shard: Shard | None = None


class Attention(UsesKernels, nn.Module):

    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype, comm: TPComm | None = None) -> None:
        super().__init__()
        shard = TPShard() if comm is None else comm.shard
        self.layer_id = layer_id
        # This rank's heads (all of them with one rank; tensor parallelism: parallel.py).
        self.num_heads = shard.heads(config)[1]
        self.num_kv_heads = shard.kv_heads(config)[1]
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=config.qkv_bias, dtype=dtype)
        self.o_proj = row_linear(q_size, config.hidden_size, config.o_proj_bias, dtype, comm)
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def project_in(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] (normed and rotated; see AttentionFn)."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        # v stays a strided view of the qkv output (last dim contiguous).
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        cache = rotary.cos_sin_cache
        q_norm, k_norm = self.q_norm, self.k_norm  # both set, or neither
        if q_norm is not None and k_norm is not None:  # Qwen3: per-head RMSNorm on q and k, before RoPE
            q, k = self.kernels.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.eps, cache, positions)
        else:
            q, k = self.kernels.rope(q, k, cache, positions)
        return q, k, v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [T, Hq, D] -> [T, H]."""
        return self.o_proj(out.reshape(out.shape[0], self.num_heads * self.head_dim))


class DecoderLayer(UsesKernels, nn.Module):

    def __init__(
        self, config: ModelConfig, layer_id: int, dtype: torch.dtype, mlp: nn.Module, comm: TPComm | None = None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer_id, dtype, comm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = mlp  # [T, H] -> [T, H]: the dense SwiGLU, or a mixture of experts

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual stream before it); the residual add is
        deferred into the next norm (one fused kernel). residual None: x is the embedding."""
        q, k, v, residual = self.before_attention(x, residual, positions, rotary)
        return self.after_attention(attn(self.self_attn.layer_id, q, k, v), residual)

    # The layer in two halves around attention: all the position-wise work (matmuls,
    # norms, RoPE, MLP) is in them, so a runner can capture each stretch between two
    # attention calls as a CUDA graph (graphs/piecewise.py) and run attention eagerly.

    def before_attention(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, residual) -> (q, k, v, residual stream)."""
        k, ln = self.kernels, self.input_layernorm
        if residual is None:
            h, residual = k.rms_norm(x, ln.weight, ln.eps), x
        else:
            h, residual = k.add_rms_norm(x, residual, ln.weight, ln.eps)
        return (*self.self_attn.project_in(h, positions, rotary), residual)

    def after_attention(self, out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output [T, Hq, D], residual) -> (mlp output, residual stream before it)."""
        ln = self.post_attention_layernorm
        h, residual = self.kernels.add_rms_norm(self.self_attn.project_out(out), residual, ln.weight, ln.eps)
        return self.mlp(h), residual


# Fused parameters and the checkpoint tensors stacked into them, in row order.
_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class DecoderForCausalLM(UsesKernels, nn.Module):
    """Llama / Qwen2 / Qwen3 causal LM; family differences come from ModelConfig flags.

    With `comm` (tensor parallelism over comm.shard.size ranks) it holds this rank's share
    of every sharded weight (parallel.py says which); without, the whole model."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, comm: TPComm | None = None) -> None:
        super().__init__()
        self.config = config
        self.comm = comm
        self.shard = TPShard() if comm is None else comm.shard
        self.shard.check(config)
        vocab_start, vocab_rows = self.shard.split(config.vocab_size, "vocab_size")
        self.embed_tokens: nn.Embedding
        if comm is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        else:
            self.embed_tokens = VocabParallelEmbedding(vocab_start, vocab_rows, config.hidden_size, dtype, comm)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, self.make_mlp(i, dtype), comm) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False, dtype=dtype)
        self.logits_packed: torch.Tensor | None = None  # the output projection packed (pack_cpu_weights)

    def pack_cpu_weights(self) -> None:
        """Float32 on the CPU: every linear layer and the output projection also hold their weight
        packed for oneDNN, which decode-sized inputs take (models/cpu_linear.py). After loading."""
        pack_linears(self)
        self.logits_packed = pack_weight(self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    def make_mlp(self, layer_id: int, dtype: torch.dtype) -> nn.Module:
        """The MLP of layer `layer_id` (called from __init__; subclasses pick per layer)."""
        c = self.config
        return SwiGLUMLP(c.hidden_size, self.shard.split(c.intermediate_size, "intermediate_size")[1], c.mlp_bias,
                         dtype, self.comm)

    @property
    def local_kv_heads(self) -> int:
        """The KV heads this rank's attention writes and reads (its KV pool's heads)."""
        return self.shard.kv_heads(self.config)[1]

    @property
    def local_heads(self) -> int:
        """The query heads this rank computes."""
        return self.shard.heads(self.config)[1]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] (what forward starts from)."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionFn,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [T] (int64), positions [T] -> hidden [T, H] after the final norm.

        positions are each token's position in its own sequence; they index the
        RoPE cache and must lie in [0, max_position_embeddings). inputs_embeds
        [T, H], when given, replaces the embedding lookup (input_ids is then unused).
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, attn)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's (x, residual) -> hidden [T, H]."""
        if residual is None:  # no layers
            return self.norm(x)
        return self.kernels.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the position-wise math with `kernels` (kernels.EAGER, or compiled_kernels())."""
        for module in self.modules():
            if isinstance(module, UsesKernels):
                module.kernels = kernels

    def moe_blocks(self) -> Sequence[nn.Module]:
        """The mixture-of-experts blocks (none in a dense model; models/moe.py)."""
        return []

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab], written to `out` if given (the cast is the copy)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = packed_linear(hidden, weight, self.logits_packed)
        if self.comm is not None:  # this rank's vocabulary columns -> every column, on every rank
            logits = self.comm.all_gather_last(logits)
        return logits.float() if out is None else out.copy_(logits)

    def moe_stats(self) -> dict[str, Any]:
        """Expert work done since the last reset (all zero for a dense model; see moe.py)."""
        return {"moe_layers": 0, "moe_tokens": 0, "routed_tokens": 0, "expert_tokens": []}

    def reset_moe_stats(self) -> None:
        """Zero the counters of moe_stats() (nothing to do for a dense model)."""

    def checkpoint_layout(self, available: Collection[str] | None = None) -> dict[str, WeightTarget]:
        """Every tensor a Hugging Face checkpoint must provide, and where it goes.

        `available` (the checkpoint's tensor names, when known) lets a model
        accept one of several layouts of the same weights; dense models have one.
        Invariant (checked by the loader): the targets of each parameter tile its
        rows exactly once, so loading all of them fills every parameter. With several
        tensor-parallel ranks each target's `shard` names the part of the tensor this rank reads.
        """
        layout: dict[str, WeightTarget] = {}
        for name, param in self.named_parameters():
            module_path, _, kind = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in _FUSED:
                row = 0
                for part, shard in zip(_FUSED[leaf], self._fused_shards(leaf)):
                    layout[f"model.{parent}.{part}.{kind}"] = WeightTarget(
                        name, row, shard.size, shard=shard if self.shard.enabled else None)
                    row += shard.size
            else:
                key = name if name.startswith("lm_head.") else f"model.{name}"
                layout[key] = WeightTarget(name, 0, param.shape[0], shard=self._shard_of(leaf, kind))
        return layout

    def _shard_of(self, leaf: str, kind: str) -> Shard | None:
        """The slice of an unfused checkpoint tensor this rank reads (None: all of it)."""
        if not self.shard.enabled:
            return None
        c = self.config
        if leaf in ("embed_tokens", "lm_head"):  # vocabulary rows
            start, size = self.shard.split(c.vocab_size, "vocab_size")
            return Shard(0, (start, ), size, c.vocab_size)
        if kind == "weight" and leaf == "o_proj":  # row-parallel: the input columns of this rank's heads
            first, count = self.shard.heads(c)
            return Shard(1, (first * c.head_dim, ), count * c.head_dim, c.q_size)
        if kind == "weight" and leaf == "down_proj":
            start, size = self.shard.split(c.intermediate_size, "intermediate_size")
            return Shard(1, (start, ), size, c.intermediate_size)
        return None  # norms, row-parallel biases, the MoE router: whole on every rank

    def _fused_shards(self, leaf: str) -> tuple[Shard, ...]:
        """Per part of a fused parameter, in row order: the rows of its checkpoint tensor this rank holds."""
        c = self.config
        if leaf == "qkv_proj":
            first, count = self.shard.heads(c)
            kv_first, kv_count = self.shard.kv_heads(c)
            d = c.head_dim
            kv = Shard(0, (kv_first * d, ), kv_count * d, c.kv_size)
            return Shard(0, (first * d, ), count * d, c.q_size), kv, kv
        start, size = self.shard.split(c.intermediate_size, "intermediate_size")
        part = Shard(0, (start, ), size, c.intermediate_size)
        return part, part

    def ignores_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors that are deliberately not loaded."""
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
            return True
        if is_kv_scale(name):  # an fp8 KV pool's scales, read by the runner (kv_scales.py)
            return True
        # Tied: the output projection is the embedding matrix, as transformers ties it.
        return self.config.tie_word_embeddings and name == "lm_head.weight"
