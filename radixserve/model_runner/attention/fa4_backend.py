"""FlashAttention-4 (`flash-attn-4`, module `flash_attn.cute`) over the token-granular KV pool.

The pool `[slots + 1, Hkv, D]` is passed as is, viewed as pages of one token
`[slots + 1, 1, Hkv, D]`, with each sequence's `req_to_token` row as its page
table: no K/V is copied. One call per layer serves a whole mixed batch
(decodes, prefill chunks over cached prefixes, fresh prefills); causal masking
is aligned to the end of each sequence, as the interface requires. A batch with
a cascade plan runs two calls per layer (the groups' shared prefixes, then each
sequence's suffix, both with `return_lse`) and merges them (attention/cascade.py);
the merge is fused by torch.compile.

Decode passes go to our Triton kernels where Triton is installed (`triton_decode`):
one query row per sequence (a decode batch, or a cascade's suffix pass in a decode
step) to the split-KV kernel (attention/triton_decode.py: on the H100 it reads K/V
at 2.9 TB/s where FA4 reaches 2.56, and 1.8x faster on many short sequences), and
a decode step's cascade prefix pass (each group's members x G heads as the rows of
one tile) to the group kernel (attention/triton_group.py), where FA4 read the
prefixes at ~1.7 TB/s (`benchmarks/decode_kernel_bench.py`, docs/benchmarks.md).
Under CUDA graphs both read the request table in place (metadata.py, indirect tables).

FA4 runs bf16/fp16 with head_dim in 8..256 (a multiple of 8) on SM 8.x-12.x.
Other calls (fp32 engines, used by the CPU/GPU parity tests) go to the torch
reference, logged once, so forcing `fa4` never changes what a model computes.

An fp8 pool (kv_pool.py): the Triton kernels read it in place and dequantize on
load (the layer's `k_scale`/`v_scale`). FA4 reads bf16/fp16 only, so a pass that
goes to FA4 (prefill chunks, mixed steps, decode passes without Triton) gathers its
sequences' K/V, dequantized to the model dtype, into a contiguous buffer and makes
FA4's varlen call without a page table (`cu_seqlens_k`). That gather needs the
batch's key count on the host, so CUDA graphs run with an fp8 pool only where the
Triton kernels serve every captured pass (`runs_in_graphs`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from radixserve.model_runner.attention.base import AttentionBackend
from radixserve.model_runner.attention.cascade import (
    CascadeMetadata,
    build_cascade_metadata,
    cascade_attend,
    merge_states,
)
from radixserve.model_runner.attention.fallback import ReferenceFallback
from radixserve.model_runner.attention.metadata import VarlenMetadata, build_varlen_metadata, flat_kv_slots
from radixserve.model_runner.attention.triton_decode import (
    DECODE_CONFIG,
    FP8_DECODE_CONFIG,
    choose_num_splits,
    paged_decode,
    triton_available,
)
from radixserve.model_runner.attention.triton_group import (
    FP8_GROUP_CONFIG,
    GROUP_CONFIG,
    choose_group_splits,
    paged_group_attend,
)
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.kv_pool import gather_kv
from radixserve.model_runner.kv_store import FP8_KV_DTYPE

logger = logging.getLogger(__name__)

FA4_DTYPES = (torch.bfloat16, torch.float16)


def fa4_supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in FA4_DTYPES and 8 <= head_dim <= 256 and head_dim % 8 == 0


def load_fa4() -> Callable | None:
    """`flash_attn.cute.flash_attn_varlen_func`, or None where the package is missing or broken."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # ImportError, or a CuTe DSL library that fails to load
        logger.debug("flash_attn.cute unavailable: %s", exc)
        return None
    return flash_attn_varlen_func


def _fa4_compiled() -> dict | None:
    """FA4's cache of compiled kernel variants (its JIT keys them on dtype, masking, LSE,
    tiling...), or None where this FA4 keeps it elsewhere."""
    try:
        from flash_attn.cute import interface
    except Exception:
        return None
    cache = getattr(getattr(interface._flash_attn_fwd, "compile_cache", None), "cache", None)
    return cache if isinstance(cache, dict) else None


@functools.cache
def _compiled_merge() -> Callable[..., torch.Tensor]:
    return torch.compile(merge_states, dynamic=True, fullgraph=True)


class FA4Attention(AttentionBackend):
    name = "fa4"
    supports_cascade = True

    def __init__(self, triton_decode: bool | None = None, kv_dtype: torch.dtype | None = None) -> None:
        fn = load_fa4()
        if fn is None:
            raise ValueError("attention backend 'fa4' needs the flash-attn-4 package (flash_attn.cute)")
        if triton_decode and not triton_available():
            raise ValueError("triton_decode=True needs the triton package")
        self.triton_decode = triton_available() if triton_decode is None else triton_decode
        self.kv_fp8 = kv_dtype == FP8_KV_DTYPE  # the pool the runner will hand over
        # Per batch: the flat slot index of each pass that gathers K/V (an fp8 pool's FA4 passes).
        self._gather_index: dict[int, torch.Tensor] = {}
        self._num_sms: int | None = None
        self._fn = fn
        self._meta: VarlenMetadata | None = None
        self._cascade: CascadeMetadata | None = None
        self._fallback = ReferenceFallback(self.name)
        self._variants = _fa4_compiled()
        # Set once the runner has warmed the backend up: from then on a call that compiles an
        # FA4 kernel variant stalls serving for seconds, so it is counted and logged as a warning.
        self.warmed = False
        self.compiles = 0  # variants compiled after warm-up

    def prepare(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> None:
        self._gather_index = {}
        if batch.cascade is not None:
            self._meta, self._cascade = None, build_cascade_metadata(batch, req_to_token)
        else:
            self._meta, self._cascade = build_varlen_metadata(batch, req_to_token), None
        self._fallback.prepare(batch, req_to_token)

    def runs_in_graphs(self, dtype: torch.dtype, head_dim: int) -> bool:
        # The kernel path; the reference fallback is not capturable, nor is an fp8 pool's
        # gather (its size is the batch's key count, a host value).
        return fa4_supports(dtype, head_dim) and (not self.kv_fp8 or self.triton_decode)

    def prepare_graph(self, meta: VarlenMetadata | None, cascade: CascadeMetadata | None = None) -> None:
        """Use metadata built on the device (`decode_graph_metadata`, or with a cascade plan
        `graph_cascade_metadata`) for a captured decode step."""
        self._meta, self._cascade = meta, cascade
        self._gather_index = {}

    def finish_warm_up(self) -> None:
        self.warmed = True

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not fa4_supports(q.dtype, q.shape[-1]) or (k_scale is None and k_cache.dtype != q.dtype):
            return self._fallback.attend(q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
        if self._cascade is not None:
            attend_lse = functools.partial(self._call_lse, k_scale=k_scale, v_scale=v_scale)
            return cascade_attend(attend_lse, _compiled_merge(), q, k_cache, v_cache, scale, self._cascade)
        assert self._meta is not None, "prepare() comes before attend()"
        out, _ = self._call(q, k_cache, v_cache, scale, self._meta, causal=True, return_lse=False,
                            k_scale=k_scale, v_scale=v_scale)
        return out

    def _call_lse(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
        meta: VarlenMetadata, causal: bool, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_call` with the lse (cascade_attend's pass function)."""
        out, lse = self._call(q, k_cache, v_cache, scale, meta, causal, return_lse=True, k_scale=k_scale,
                              v_scale=v_scale)
        assert lse is not None
        return out, lse

    def _call(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
        meta: VarlenMetadata, causal: bool, return_lse: bool,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The Triton kernels' scale arguments, passed only for an fp8 pool (read in place, with them).
        scales: dict[str, Any] = {} if k_scale is None else {"k_scale": k_scale, "v_scale": v_scale}
        if self.triton_decode and meta.max_seqlen_q == 1 and q.shape[0] == meta.seqused_k.shape[0]:
            # One query row per sequence, the last position: causal or not attends to every key.
            return self._decode(q, k_cache, v_cache, scale, meta, return_lse, scales)
        if self.triton_decode and meta.decode_rows and not causal:
            # A decode step's cascade prefix pass: a group's members x G heads form one tile.
            return self._group(q, k_cache, v_cache, scale, meta, return_lse, scales)
        if meta.table_rows is not None:
            raise RuntimeError("an indirect page table reached FA4, which takes gathered tables only")
        known = len(self._variants) if self._variants is not None else 0
        start = time.perf_counter()
        # What both FA4 calls share: the query side, the key bound, the scale and the mask.
        common = dict(cu_seqlens_q=meta.cu_seqlens_q, max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
                      softmax_scale=scale, causal=causal, return_lse=return_lse)
        if k_scale is None:
            result = self._fn(
                q,
                k_cache.unsqueeze(1),  # [pages, page_size = 1, Hkv, D], a view
                v_cache.unsqueeze(1),
                seqused_k=meta.seqused_k,
                page_table=meta.page_table,
                **common,
            )
        else:
            k, v = self._gathered(k_cache, v_cache, meta, k_scale, v_scale, q.dtype)
            result = self._fn(q, k, v, cu_seqlens_k=meta.cu_seqlens_k, **common)
        if self._variants is not None and len(self._variants) > known:
            seconds = time.perf_counter() - start
            if self.warmed:
                self.compiles += 1
            logger.log(
                logging.WARNING if self.warmed else logging.DEBUG,
                "FA4 compiled a kernel variant (%.1f s): %d sequences, %d query rows (max %d per sequence), "
                "max %d keys, causal=%s, lse=%s; key %s",
                seconds, meta.seqused_k.shape[0], q.shape[0], meta.max_seqlen_q, meta.max_seqlen_k, causal,
                return_lse, list(self._variants)[known:],
            )
        return result

    def _gathered(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: VarlenMetadata, k_scale: torch.Tensor,
        v_scale: torch.Tensor | None, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An fp8 pool's K/V for an FA4 pass: `[total_k, Hkv, D]` each, gathered in sequence
        order and dequantized to `dtype` (a scratch buffer per layer), for one varlen call with
        `cu_seqlens_k`. The slot index is built once per pass and batch."""
        if meta.total_k < 0:
            raise RuntimeError("an fp8 pool's FA4 pass needs the batch's key count, which graph metadata lacks")
        index = self._gather_index.get(id(meta))
        if index is None:
            index = self._gather_index[id(meta)] = flat_kv_slots(meta)
        return gather_kv(k_cache, index, k_scale, dtype), gather_kv(v_cache, index, v_scale, dtype)

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
        meta: VarlenMetadata, return_lse: bool, scales: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Triton split-KV kernel; the split count depends on shapes only (graph-safe)."""
        splits = choose_num_splits(q.shape[0], k_cache.shape[1], self._sms(q.device))
        config = FP8_DECODE_CONFIG if scales else DECODE_CONFIG  # each the fastest of its sweep
        result = paged_decode(
            q, k_cache, v_cache, meta.page_table, meta.seqused_k, scale, splits,
            return_lse=return_lse, config=config, table_rows=meta.table_rows, table_start=meta.table_start,
            **scales,
        )
        return result if isinstance(result, tuple) else (result, None)  # a tuple with return_lse

    def _group(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
        meta: VarlenMetadata, return_lse: bool, scales: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Triton group kernel over a decode step's prefix pass (shape-only splits)."""
        rows, groups = q.shape[0], meta.seqused_k.shape[0]
        config = FP8_GROUP_CONFIG if scales else GROUP_CONFIG
        splits = choose_group_splits(rows, groups, q.shape[1], k_cache.shape[1], self._sms(q.device), config)
        result = paged_group_attend(
            q, k_cache, v_cache, meta.page_table, meta.seqused_k, meta.cu_seqlens_q, scale, splits,
            return_lse=return_lse, config=config, table_rows=meta.table_rows, **scales,
        )
        return result if isinstance(result, tuple) else (result, None)  # a tuple with return_lse
