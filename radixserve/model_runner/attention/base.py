"""The attention backend interface: prefill-with-prefix and decode over slot lists."""

from __future__ import annotations

from typing import Protocol

import torch

from radixserve.model_runner.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    """One backend serves every layer of one forward pass.

    `prepare` runs once per batch (build slot lists, masks, kernel metadata);
    `attend` runs once per layer after the layer's new K/V are in the pool.
    A backend with `supports_cascade` honours `ForwardBatch.cascade` (a shared
    prefix attended once per group, attention/cascade.py); the scheduler plans
    cascades only for such backends.
    """

    name: str
    supports_cascade: bool

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None: ...

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q `[T, Hq, D]` for the batch's new tokens; caches `[slots, Hkv, D]`; returns `[T, Hq, D]`."""
        ...
