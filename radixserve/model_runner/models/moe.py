"""Qwen3-MoE: the sparse mixture-of-experts MLP and the model built from it.

A sparse layer sends every token to `top_k` of `E` SwiGLU experts (as transformers'
Qwen3MoeSparseMoeBlock does, step for step):

    logits  = gate(x)                              [T, E]  in the model dtype
    probs   = softmax(logits, in float32)          [T, E]
    w, ids  = topk(probs, top_k)                   [T, k]  (w / w.sum() when norm_topk_prob),
                                                           w cast back to the model dtype
    out[t]  = sum_j w[t, j] * expert_ids[t, j](x[t])

Experts are stored stacked: `w_gate_up` [E, 2I, H] (gate rows first) and `w_down`
[E, H, I]. The T*k (token, expert) pairs are sorted by expert id, which makes each
expert's tokens one contiguous block of rows; then either one grouped GEMM per
projection computes every block (`grouped_mm`), or a loop over the experts that
have tokens does, one matmul pair each (`loop`: exact, any device, one host sync).
Results go back to (token, slot) order and are summed over the k slots in slot
order, so a token's output does not depend on what else shares its batch.

Tensor parallelism splits every expert's intermediate dim over the ranks (each rank a
slice of every expert, so the work stays balanced whatever the routing): the router runs
whole on every rank (the same routing everywhere), each rank's experts give a partial
output, and one all-reduce per block sums them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model_runner.config import MOE_BACKENDS
from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.models.decoder import DecoderForCausalLM, Shard, WeightTarget
from radixserve.model_runner.parallel import TPComm

logger = logging.getLogger(__name__)

# MOE_BACKENDS (model_runner/config.py): "auto" is grouped_mm on CUDA where it works for the
# model's dtype and shapes, else loop.


class Routing(NamedTuple):
    """Each token's experts: `expert_ids` [T, k] (int64, by falling probability) and their
    `weights` [T, k] in the router logits' dtype."""

    weights: torch.Tensor
    expert_ids: torch.Tensor


class ExpertGroups(NamedTuple):
    """The T*k (token, slot) pairs sorted by expert id (stable: token order within an expert).

    order [T*k]: sorted row r holds pair `order[r]` = token * k + slot.
    ends [E] (int32): expert e's rows are [ends[e-1], ends[e]) (ends[-1] == T*k);
      the cumulative counts grouped GEMMs take as `offs`.
    counts [E] (int64): rows per expert.
    """

    order: torch.Tensor
    ends: torch.Tensor
    counts: torch.Tensor


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """Top-k experts of each token from router logits [T, E] (softmax in float32, as transformers)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights.to(router_logits.dtype), expert_ids)


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the pairs of `expert_ids` [T, k] by expert. No host sync (CUDA-graph safe):
    the block ends come from a search in the sorted ids, where bincount on CUDA would read
    max() back to the host."""
    sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)
    experts = torch.arange(num_experts, device=expert_ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, experts, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return ExpertGroups(order, ends.to(torch.int32), counts)


def experts_loop(xs: torch.Tensor, groups: ExpertGroups, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over expert-sorted rows xs [S, H] -> [S, H]: one matmul pair per expert
    that has rows (a loop over experts, never over tokens). Reads the block ends to the host."""
    ys = torch.empty_like(xs)
    start = 0
    for expert, end in enumerate(groups.ends.tolist()):
        if end > start:
            gate, up = F.linear(xs[start:end], w_gate_up[expert]).chunk(2, dim=-1)
            ys[start:end] = F.linear(F.silu(gate) * up, w_down[expert])
        start = end
    return ys


def experts_grouped_mm(
    xs: torch.Tensor, groups: ExpertGroups, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The same as experts_loop with one grouped GEMM per projection, no host sync.

    The weights go in transposed ([E, H, 2I] and [E, I, H] views, column-major), the layout
    the CUDA kernels take without a copy; rows must be 16-byte aligned (resolve_moe_backend checks).
    """
    grouped_mm = _grouped_mm_function()
    assert grouped_mm is not None, "resolve_moe_backend picks grouped_mm only where it exists"
    gate, up = grouped_mm(xs, w_gate_up.transpose(1, 2), offs=groups.ends).chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=groups.ends)


_EXPERT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"loop": experts_loop, "grouped_mm": experts_grouped_mm}


def _grouped_mm_function() -> Callable[..., torch.Tensor] | None:
    # The public name arrived after the private one; both take (a [S, K], b [E, K, N], offs=).
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_unavailable(
    device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int
) -> str | None:
    """Why grouped_mm cannot run the experts on (device, dtype, shapes), or None when it can."""
    grouped_mm = _grouped_mm_function()
    if grouped_mm is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "grouped_mm needs a GPU of compute capability 8.0 or newer"
    for what, size in (("hidden_size", hidden_size), ("moe_intermediate_size", intermediate_size)):
        if size * dtype.itemsize % 16:
            return f"{what} {size} in {dtype} gives rows that are not 16-byte aligned"
    try:  # the kernels' dtype support varies by device and torch version: ask them
        rows = torch.ones(4, 16, device=device, dtype=dtype)
        weight = torch.ones(2, 8, 16, device=device, dtype=dtype)  # [E, N, K], passed transposed as for real
        grouped_mm(rows, weight.transpose(1, 2), offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"grouped_mm fails on {device} in {dtype}: {exc}"
    return None


def resolve_moe_backend(
    name: str, device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int
) -> str:
    """The expert implementation `name` asks for on (device, dtype): "grouped_mm" or "loop".

    "auto" takes grouped_mm on CUDA where it works, else loop (the exact path, and the one
    CPUs get). Forcing "grouped_mm" where it cannot run is a ValueError saying why.
    """
    if name not in MOE_BACKENDS:
        raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}; got {name!r}")
    if name == "loop" or (name == "auto" and device.type != "cuda"):
        return "loop"
    reason = grouped_mm_unavailable(device, dtype, hidden_size, intermediate_size)
    if reason is None:
        return "grouped_mm"
    if name == "grouped_mm":
        raise ValueError(f"moe_backend 'grouped_mm' is unavailable: {reason}")
    logger.info("MoE experts use the per-expert loop: %s", reason)
    return "loop"


class SparseMoeBlock(nn.Module):
    """The mixture-of-experts MLP of one layer: router `gate` [E, H] and stacked SwiGLU experts."""

    expert_tokens: torch.Tensor  # a buffer (register_buffer)

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
        dtype: torch.dtype, comm: TPComm | None = None,
    ) -> None:
        super().__init__()
        self.comm = comm  # intermediate_size is this rank's share when set
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.backend = "loop"  # Qwen3MoeForCausalLM.set_moe_backend picks it per device
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                      requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                                   requires_grad=False)
        # (token, expert) pairs each expert has computed since the last reset; on the device
        # and updated in place, so counting costs no sync and keeps counting under CUDA graphs.
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        tokens = x.shape[0]
        routing = route(self.gate(x), self.top_k, self.renormalize)
        groups = group_by_expert(routing.expert_ids, self.num_experts)
        self.expert_tokens.add_(groups.counts)
        xs = x.index_select(0, groups.order // self.top_k)  # [T*k, H], grouped by expert
        ys = _EXPERT_FUNCTIONS[self.backend](xs, groups, self.w_gate_up, self.w_down)
        ys = ys * routing.weights.reshape(-1, 1).index_select(0, groups.order)
        # Back to (token, slot) order, then the k slots of each token summed in slot order.
        out = torch.empty_like(ys).index_copy_(0, groups.order, ys)
        out = out.view(tokens, self.top_k, x.shape[1]).sum(dim=1)
        return out if self.comm is None else self.comm.all_reduce(out)


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen3 (q/k norm, GQA) whose `config.moe_layers` have a SparseMoeBlock as MLP."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, comm: TPComm | None = None) -> None:
        super().__init__(config, dtype, comm)
        self.moe_backend = "loop"

    def make_mlp(self, layer_id: int, dtype: torch.dtype) -> nn.Module:
        c = self.config
        if not c.is_moe_layer(layer_id):
            return super().make_mlp(layer_id, dtype)
        size = self.shard.split(c.moe_intermediate_size, "moe_intermediate_size")[1]
        return SparseMoeBlock(
            c.hidden_size, size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, dtype, self.comm
        )

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def set_moe_backend(self, name: str = "auto") -> str:
        """Choose the expert implementation (see MOE_BACKENDS) for the weights' device and dtype;
        returns the one chosen. ValueError when a forced one cannot run here."""
        c = self.config
        weight = self.embed_tokens.weight
        self.moe_backend = resolve_moe_backend(
            name, weight.device, weight.dtype, c.hidden_size,
            self.shard.split(c.moe_intermediate_size, "moe_intermediate_size")[1],
        )
        for block in self.moe_blocks():
            block.backend = self.moe_backend
        return self.moe_backend

    def moe_stats(self) -> dict[str, Any]:
        """Expert work since the last reset, summed over the MoE layers (reads the device counters).

        routed_tokens: (token, expert) pairs computed; moe_tokens: token rows that went
        through an MoE layer (routed_tokens / top_k); expert_tokens: routed_tokens per expert.
        """
        blocks = self.moe_blocks()
        per_expert = torch.stack([b.expert_tokens for b in blocks]).sum(dim=0).tolist() if blocks else []
        routed = sum(per_expert)
        k = self.config.num_experts_per_tok
        return {
            "moe_layers": len(blocks),
            "moe_tokens": routed // k if k else 0,
            "routed_tokens": routed,
            "expert_tokens": per_expert,
        }

    def reset_moe_stats(self) -> None:
        for block in self.moe_blocks():
            block.expert_tokens.zero_()

    def checkpoint_layout(self, available: Collection[str] | None = None) -> dict[str, WeightTarget]:
        """The dense layout, with each MoE layer's experts in one of two layouts, per layer:
        transformers' stacked `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I]
        (`save_pretrained(save_original_format=False)`) when `available` has it, else one
        tensor per expert and projection, `experts.{e}.{gate,up,down}_proj.weight` (Hugging
        Face checkpoints and transformers' default save), stacked here at load time."""
        layout = {
            name: target
            for name, target in super().checkpoint_layout(available).items()
            if not target.param.endswith((".w_gate_up", ".w_down"))
        }
        c = self.config
        full = c.moe_intermediate_size
        start, size = self.shard.split(full, "moe_intermediate_size")
        # With several ranks, this rank's slice of each expert's intermediate dim (parallel.py).
        rows = column = gate_up = None
        if self.shard.enabled:
            rows, column = Shard(0, (start, ), size, full), Shard(1, (start, ), size, full)
            gate_up = Shard(1, (start, full + start), size, 2 * full)
        for layer_id in c.moe_layers:
            prefix, param = f"model.layers.{layer_id}.mlp.experts", f"layers.{layer_id}.mlp"
            if available is not None and f"{prefix}.gate_up_proj" in available:
                stacked_down = None if column is None else column._replace(dim=2)
                layout[f"{prefix}.gate_up_proj"] = WeightTarget(f"{param}.w_gate_up", 0, c.num_experts,
                                                                shard=gate_up)
                layout[f"{prefix}.down_proj"] = WeightTarget(f"{param}.w_down", 0, c.num_experts, shard=stacked_down)
                continue
            for e in range(c.num_experts):
                layout[f"{prefix}.{e}.gate_proj.weight"] = WeightTarget(f"{param}.w_gate_up", 0, size, e, rows)
                layout[f"{prefix}.{e}.up_proj.weight"] = WeightTarget(f"{param}.w_gate_up", size, size, e, rows)
                layout[f"{prefix}.{e}.down_proj.weight"] = WeightTarget(f"{param}.w_down", 0, c.hidden_size, e,
                                                                        column)
        return layout
