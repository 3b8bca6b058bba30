"""PyTorch's own varlen FlashAttention (`torch.nn.attention.varlen.varlen_attn`, FA2 inside).

Its paged mode needs pages of 256 tokens, so with our one-token pages each
layer gathers every sequence's K/V into a contiguous `[total_k, Hkv, D]`
buffer (one indexed copy, index built once per batch) and runs one varlen
call. For a fresh prefill that gather is the batch's own K/V (cheap next to
the attention itself); for decodes over long contexts it reads the context
twice, so `fa4` (which reads the pool in place) is preferred where it exists.

Causal masking: FA2 aligns the causal diagonal to the bottom right when
seqlen_q < seqlen_k, i.e. to the end of each sequence, as the interface needs.
The function's signature moved between torch releases (`is_causal` became
`window_size=(-1, 0)`, `enable_gqa` and `scale` were added), so the call is
assembled from what the installed version accepts.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.fallback import ReferenceFallback
from radixserve.model_runner.attention.metadata import VarlenMetadata, build_varlen_metadata, flat_kv_slots
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.kv_pool import gather_kv

logger = logging.getLogger(__name__)

VARLEN_DTYPES = (torch.bfloat16, torch.float16)


def load_varlen() -> tuple[Callable, frozenset[str]] | None:
    """`varlen_attn` and its keyword names, or None where this torch has none (or no causal mode)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:
        logger.debug("torch.nn.attention.varlen unavailable: %s", exc)
        return None
    names = frozenset(inspect.signature(varlen_attn).parameters)
    if "window_size" not in names and "is_causal" not in names:
        return None
    return varlen_attn, names


def varlen_supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in VARLEN_DTYPES and head_dim <= 256 and head_dim % 8 == 0


class TorchVarlenAttention(AttentionBackend):
    name = "torch_varlen"
    supports_cascade = False  # not wired: the per-layer gather copies each whole context anyway

    def __init__(self) -> None:
        loaded = load_varlen()
        if loaded is None:
            raise ValueError("attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
        self._fn, names = loaded
        self._causal_kw = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
        self._has_gqa_flag = "enable_gqa" in names
        self._has_scale = "scale" in names
        self._meta: VarlenMetadata | None = None
        self._kv_index: torch.Tensor | None = None
        self._fallback = ReferenceFallback(self.name)

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        self._meta = build_varlen_metadata(batch, req_to_token)
        self._kv_index = flat_kv_slots(self._meta)
        self._fallback.prepare(batch, req_to_token)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not varlen_supports(q.dtype, q.shape[-1]) or (k_scale is None and k_cache.dtype != q.dtype):
            return self._fallback.attend(q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
        m, kv_index = self._meta, self._kv_index
        assert m is not None and kv_index is not None, "prepare() comes before attend()"
        # The gather every layer makes anyway dequantizes an fp8 pool on the way.
        k = gather_kv(k_cache, kv_index, k_scale, q.dtype)
        v = gather_kv(v_cache, kv_index, v_scale, q.dtype)
        kwargs = dict(self._causal_kw)
        if self._has_gqa_flag:
            kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
        if self._has_scale:
            kwargs["scale"] = scale
        else:  # the kernel's default scale is 1/sqrt(D)
            q = q * (scale * math.sqrt(q.shape[-1]))
        return self._fn(
            q, k, v, m.cu_seqlens_q, m.cu_seqlens_k, m.max_seqlen_q, m.max_seqlen_k, **kwargs
        )
