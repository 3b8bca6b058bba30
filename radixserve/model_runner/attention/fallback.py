"""The torch reference, prepared lazily, for calls a fast backend's kernel cannot run.

Fast kernels run bf16/fp16 only; an fp32 engine on the GPU (the parity tests)
still forces or auto-picks them, and gets exactly the reference's numerics.
"""

from __future__ import annotations

import logging

import torch

from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.model_runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


class ReferenceFallback:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._ref = TorchAttention()
        # The last prepare()'s batch and request table, until the reference is built for them.
        self._pending: tuple[ForwardBatch, torch.Tensor] | None = None
        self._logged = False

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        """Remember the batch; the reference builds its per-sequence state only if called."""
        self._pending = (batch, req_to_token)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self._logged:
            logger.info(
                "%s does not run dtype %s / head_dim %d: the torch reference serves these calls",
                self._owner, q.dtype, q.shape[-1],
            )
            self._logged = True
        if self._pending is not None:
            self._ref.prepare(*self._pending)
            self._pending = None
        return self._ref.attend(q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
