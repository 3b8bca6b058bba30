"""The reference backend: PyTorch SDPA per sequence over its gathered slot list.

Runs anywhere (CPU tests, GPU checks). Causal masking is aligned to the end of
each sequence: new token t of a sequence with prefix length p sees K/V
positions 0..p+t. A batch with a cascade plan runs the two cascade passes in
float32 and merges them (attention/cascade.py), so the CPU tests check the
cascade algebra the GPU kernels run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.cascade import (
    CascadeMetadata,
    build_cascade_metadata,
    cascade_attend,
    merge_states,
    reference_attend_lse,
)
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.kv_pool import gather_kv


class TorchAttention(AttentionBackend):
    name = "torch"
    supports_cascade = True

    def __init__(self) -> None:
        self._seqs: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        self._cascade: CascadeMetadata | None = None

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        """Per sequence: its rows in the batch, its slot list and its causal mask."""
        self._seqs = []
        self._cascade = None
        if batch.cascade is not None:
            self._cascade = build_cascade_metadata(batch, req_to_token)
            return
        start = 0
        for row, prefix, extend in zip(batch.req_rows, batch.prefix_lens, batch.extend_lens):
            total = prefix + extend
            slots = req_to_token[row, :total]
            mask = None
            if extend > 1:
                # Key j is visible to new token t iff j <= prefix + t.
                q_pos = torch.arange(extend, device=slots.device).unsqueeze(1) + prefix
                k_pos = torch.arange(total, device=slots.device).unsqueeze(0)
                mask = k_pos <= q_pos
            self._seqs.append((start, extend, slots, mask))
            start += extend

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._cascade is not None:
            attend_lse = functools.partial(reference_attend_lse, k_scale=k_scale, v_scale=v_scale)
            return cascade_attend(attend_lse, merge_states, q, k_cache, v_cache, scale, self._cascade)
        out = torch.empty_like(q)
        for start, extend, slots, mask in self._seqs:
            qi = q[start : start + extend].transpose(0, 1)  # [Hq, n, D]
            ki = gather_kv(k_cache, slots, k_scale, q.dtype).transpose(0, 1)  # [Hkv, L, D], real values
            vi = gather_kv(v_cache, slots, v_scale, q.dtype).transpose(0, 1)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + extend] = oi.transpose(0, 1)
        return out
