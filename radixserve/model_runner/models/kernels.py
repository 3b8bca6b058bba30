"""The decoder's position-wise math as pure functions, eager or fused by torch.compile.

Between the matmuls and attention, a layer runs a residual add, two RMSNorms,
a per-head q/k RMSNorm (Qwen3), RoPE and SiLU-and-multiply. Eagerly that is
about 50 small kernels per layer (each norm round-trips through float32), and
at decode sizes each kernel costs its launch, not its bytes: 2.9 ms of a 12 ms
step at batch 256 for Qwen3-0.6B on an H100 (docs/benchmarks.md). torch.compile
(Inductor) fuses each function below into one or two Triton kernels.

The eager versions follow transformers step by step (norm in float32, cast
back before the weight; cos/sin in the model dtype), so fp32 results match it
to rounding. Inductor may keep an intermediate in float32 where eager rounds
it to bf16, so compiled bf16 results differ from eager ones by rounding only.

Functions take tensors and plain numbers only (no modules), so one compiled
graph serves every layer: guards see shapes and dtypes, never which layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (any leading shape)."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        # torch's fused op computes the same float32 steps in one pass (bitwise equal on the
        # CPU, tests/test_kernels.py), where the steps below make five passes over x.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual stream and the next block's input."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rope(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] rotated by positions [T]; new contiguous tensors.

    `cos_sin_cache[p] = [cos | sin]` (see RotaryEmbedding), half-split layout as
    transformers' rotate_half."""
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q and k, then RoPE (the norm comes first)."""
    return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos_sin_cache, positions)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one [T, I] tensor fewer to allocate and fill


class Kernels(NamedTuple):
    """One implementation of each position-wise function (all with the signatures above)."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    qk_norm_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    compiled: bool


EAGER = Kernels(rms_norm, add_rms_norm, rope, qk_norm_rope, silu_and_mul, compiled=False)


class UsesKernels:
    """Mixed into the modules whose position-wise math goes through `kernels`:
    DecoderForCausalLM.use_kernels sets it on every one of them in a model."""

    kernels: Kernels = EAGER


@functools.cache
def compiled_kernels() -> Kernels:
    """EAGER under torch.compile (dynamic shapes: one graph per function for every batch
    size). Compilation happens on first call, per device and dtype; the CUDA-graph runner
    warms every bucket up before capture, so nothing compiles inside a capture."""

    # Each model shape (head layout, dtype, a batch of one) compiles its own graph of a
    # function, and every engine of the process shares them: dynamo's default of 8 per
    # function is too few for a process that serves or tests several models. Past the limit
    # fullgraph=True makes it an error, never a silent fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def fuse(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=True, fullgraph=True)

    return Kernels(
        fuse(rms_norm), fuse(add_rms_norm), fuse(rope), fuse(qk_norm_rope), fuse(silu_and_mul), compiled=True
    )


def compile_unsupported_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device` (None: they can; on the CPU Inductor
    writes C++, on CUDA it needs Triton)."""
    if device.type != "cuda":
        return None
    try:
        import triton  # noqa: F401  (Inductor's GPU code generator)
    except ImportError:
        return "triton is not installed"
    return None
