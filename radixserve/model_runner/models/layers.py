"""Building blocks of the decoder: RMSNorm, rotary embedding, SwiGLU MLP.

The math itself lives in kernels.py (eager, or fused by torch.compile on GPUs);
these modules hold the weights and caches.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.model_runner.models.kernels import UsesKernels, rms_norm
from radixserve.model_runner.models.parallel_layers import row_linear
from radixserve.model_runner.parallel import TPComm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (any leading shape)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin cache that kernels.rope rotates q and k by, indexed by position.

    `cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_scaling`,
    shape [max_positions, head_dim], in the model dtype. Positions must lie in
    [0, max_positions): the caller validates context lengths.
    """

    cos_sin_cache: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, head_dim: int, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.max_positions = max_positions
        # Filled by set_frequencies (after the model is materialized on its device).
        self.register_buffer("cos_sin_cache", torch.empty(max_positions, head_dim, dtype=dtype), persistent=False)

    @torch.no_grad()
    def set_frequencies(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        """Fill the cache from inv_freq [head_dim // 2] (float32), on the cache's device."""
        cache = self.cos_sin_cache
        inv_freq = inv_freq.to(device=cache.device, dtype=torch.float32)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=cache.device)
        freqs = positions[:, None] * inv_freq[None, :]
        # As transformers: scale in float32, then cast to the model dtype.
        cos = freqs.cos() * attention_scaling
        sin = freqs.sin() * attention_scaling
        cache.copy_(torch.cat((cos, sin), dim=-1))


class SwiGLUMLP(UsesKernels, nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (gate rows first).

    With `comm`, `intermediate_size` is this rank's share: gate/up column-parallel, down
    row-parallel (one all-reduce)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype, comm: TPComm | None = None
    ) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = row_linear(intermediate_size, hidden_size, bias, dtype, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x)))
