"""Attention backends, chosen by name through a small registry."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.torch_backend import TorchAttention

logger = logging.getLogger(__name__)

_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchAttention}


def available_backends(device: torch.device) -> list[str]:
    """Names usable on `device`, fastest first."""
    return ["torch"]


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    """Build the backend `name`; "auto" picks the fastest available on `device`."""
    usable = available_backends(device)
    if name == "auto":
        name = usable[0]
    elif name not in _BACKENDS:
        raise ValueError(f"attention_backend must be 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")
    elif name not in usable:
        raise ValueError(f"attention_backend {name!r} is not available on {device}; available: {usable}")
    logger.info("attention backend: %s", name)
    return _BACKENDS[name]()


__all__ = ["AttentionBackend", "available_backends", "create_backend"]
