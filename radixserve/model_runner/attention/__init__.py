"""Attention backends, chosen by name through a small registry.

    fa4           FlashAttention-4 over the pool in place (page size 1); Hopper/Blackwell
    torch_varlen  PyTorch's varlen FlashAttention-2 on K/V gathered per layer; SM 8.0+
    cpu           every sequence in one padded batched call per layer, shared prefixes read
                  once per group; CPU devices
    torch         the reference: SDPA per sequence; anywhere

"auto" takes the first available on the device that runs the model's dtype and
head_dim (fast kernels are bf16/fp16 only); an fp32 model on the GPU therefore
gets `torch`. A forced fast backend still serves fp32 calls, through the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.cpu_backend import AUTO_CASCADE_MIN_PREFIX, CPUAttention
from radixserve.model_runner.attention.fa4_backend import FA4Attention, fa4_supports, load_fa4
from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.model_runner.attention.varlen_backend import TorchVarlenAttention, load_varlen, varlen_supports
from radixserve.model_runner.cpu_threads import configure_cpu_threads

logger = logging.getLogger(__name__)


class _Entry(NamedTuple):
    factory: Callable[[], AttentionBackend]
    usable: Callable[[torch.device], bool]  # imports and the device can run it
    supports: Callable[[torch.dtype, int], bool]  # dtype, head_dim


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _fa4_usable(device: torch.device) -> bool:
    # The interface runs SM 8.x-12.x; it is tuned (and was checked here) on 9.0 and 10.x.
    return device.type == "cuda" and _capability(device)[0] in (8, 9, 10, 11, 12) and load_fa4() is not None


def _varlen_usable(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device) >= (8, 0) and load_varlen() is not None


# Fastest first: this order is what "auto" walks.
_BACKENDS: dict[str, _Entry] = {
    "fa4": _Entry(FA4Attention, _fa4_usable, fa4_supports),
    "torch_varlen": _Entry(TorchVarlenAttention, _varlen_usable, varlen_supports),
    "cpu": _Entry(CPUAttention, lambda device: device.type == "cpu", lambda dtype, head_dim: True),
    "torch": _Entry(TorchAttention, lambda device: True, lambda dtype, head_dim: True),
}


@functools.cache
def _available(device: torch.device) -> tuple[str, ...]:
    return tuple(name for name, entry in _BACKENDS.items() if entry.usable(device))


def available_backends(device: torch.device | str) -> list[str]:
    """Names whose kernels import and run on `device`, fastest first (`torch` always last)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return list(_available(device))


def create_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    triton_decode: bool | None = None,
    cascade: bool = True,
    kv_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """Build the backend `name`; "auto" picks the fastest available on `device`.

    `cascade` False (the engine's cascade_attention=False) keeps the CPU backend from
    grouping shared prefixes on its own (it attends to each sequence's whole context).
    `kv_dtype` is what the KV pool stores (None: `dtype`); every backend reads an fp8
    pool (float8_e4m3fn with per-head scales, kv_pool.py).

    With `dtype` and `head_dim` given, "auto" skips backends whose kernels do
    not run them (an fp32 model on the GPU gets `torch`). Forcing a backend that
    is not available on the device is a ValueError naming the ones that are. On
    the CPU this is also where torch's thread count is set (cpu_threads.py).
    """
    usable = available_backends(device)
    if torch.device(device).type == "cpu":
        configure_cpu_threads()
    if name == "auto":
        fits = [
            n for n in usable
            if dtype is None or head_dim is None or _BACKENDS[n].supports(dtype, head_dim)
        ]
        name = fits[0]
    elif name not in _BACKENDS:
        raise ValueError(f"attention_backend must be 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")
    elif name not in usable:
        raise ValueError(f"attention_backend {name!r} is not available on {device}; available: {usable}")
    if name != "fa4" and triton_decode:
        raise ValueError(f"triton_decode=True needs attention_backend 'fa4', got {name!r}")
    if name == "fa4":
        backend: AttentionBackend = FA4Attention(triton_decode, kv_dtype)
    elif name == "cpu":
        backend = CPUAttention(AUTO_CASCADE_MIN_PREFIX if cascade else 0)
    else:
        backend = _BACKENDS[name].factory()
    decode = ", decode passes Triton split-KV" if backend.triton_decode else ""
    logger.info("attention backend: %s%s (available on %s: %s)", name, decode, device, ", ".join(usable))
    return backend


__all__ = ["AttentionBackend", "available_backends", "create_backend"]
