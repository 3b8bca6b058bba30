"""Building blocks of the decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Numerics follow transformers' Llama/Qwen code step by step (norm in float32 and
cast back before the weight, cos/sin cast to the model dtype before use), so
fp32 results match to rounding and bf16 results stay close.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (any leading shape)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by per-token positions, from a cos/sin cache indexed by position.

    `cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_scaling`,
    shape [max_positions, head_dim], in the model dtype. Positions must lie in
    [0, max_positions): the caller validates context lengths.
    """

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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated (q, k), new tensors."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same as transformers' x * cos + rotate_half(x) * sin on the half-split layout.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (gate rows first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
