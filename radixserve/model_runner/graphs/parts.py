"""What the graph runners capture: the model runner's parts, named (never the runner itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.models import AttentionFn, DecoderForCausalLM

# The per-layer attention of a prepared batch: (slots, unfold, fold) -> AttentionFn, which writes
# each layer's new K/V at `slots` and attends over the pool (ModelRunner.attention).
AttentionFactory = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], AttentionFn]


class GraphParts(NamedTuple):
    model: DecoderForCausalLM
    model_config: ModelConfig
    backend: AttentionBackend
    table: torch.Tensor  # the request table, req_to_token[row, position] = slot
    attention: AttentionFactory
    device: torch.device
    dtype: torch.dtype
    vocab_size: int


def unsupported_reason(parts: GraphParts) -> str | None:
    """Why CUDA graphs (decode graphs and graph pieces) cannot run with these parts, or None."""
    if parts.device.type != "cuda":
        return f"cuda_graphs needs a CUDA device, got device {str(parts.device)!r}"
    if not parts.backend.runs_in_graphs(parts.dtype, parts.model_config.head_dim):
        return (
            "cuda_graphs needs an attention backend that runs under CUDA graphs (fa4 with a bfloat16/float16 "
            f"model), got backend {parts.backend.name!r} with {parts.dtype}"
        )
    if parts.model.moe_blocks():
        return "cuda_graphs does not support mixture-of-experts models (their routing syncs)"
    return None
