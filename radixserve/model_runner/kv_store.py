"""Writing a step's new K/V into the pool: one Triton launch on the GPU, indexed copies elsewhere.

`store_kv` is the pool's only write. On CUDA where triton is installed it launches
kv_store_kernels.store_kv_kernel (one program per token, both tensors, the fp8
quantization fused in); elsewhere, and for the reference in tests, `cache[slots] = x`.
An fp8 pool's format (stored = e4m3(clamp(x / scale, -448, 448))) is kv_pool.py's.
Both write the same bytes: for an fp8 pool each value is saturate(x / scale[h]) rounded to
the nearest e4m3, the scale per KV head.
"""

from __future__ import annotations

import importlib

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)  # 448: larger magnitudes saturate


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`[T, H, D]` values -> e4m3 with the per-head `scale` `[H]`, saturating at +-448.
    Device ops only: it runs inside captured CUDA graphs."""
    return (x.float() / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def kernel_available(pool_tensor: torch.Tensor) -> bool:
    """Whether `store_kv` launches the Triton kernel for a pool tensor (on CUDA, with triton)."""
    # Imported here: the attention package imports kv_pool, which imports this module.
    from radixserve.model_runner.attention.triton_decode import triton_available

    return pool_tensor.is_cuda and triton_available()


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kernel: bool | None = None,
) -> None:
    """`k_cache[slots] = k`, `v_cache[slots] = v` (k, v `[T, Hkv, D]`, slots `[T]`), cast to the
    pool's dtype; an fp8 pool (float8_e4m3fn) takes `k_scale`, `v_scale` (`[Hkv]` float32) and
    stores saturate(x / scale). `kernel`: None launches the Triton kernel where
    `kernel_available`; True forces it (tests run it under Triton's interpreter); False never.

    Nothing here reads a tensor's contents on the host, so a call is CUDA-graph capturable."""
    fp8 = k_cache.dtype == FP8_KV_DTYPE
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV pool needs k_scale and v_scale")
    use_kernel = kernel_available(k_cache) if kernel is None else kernel
    if not use_kernel or k.shape[0] == 0:
        if fp8:  # written as bytes: not every device indexes float8
            assert k_scale is not None and v_scale is not None  # checked above
            k_cache.view(torch.uint8)[slots] = quantize_kv(k, k_scale).view(torch.uint8)
            v_cache.view(torch.uint8)[slots] = quantize_kv(v, v_scale).view(torch.uint8)
        else:
            k_cache[slots] = k.to(k_cache.dtype)
            v_cache[slots] = v.to(v_cache.dtype)
        return
    _launch(k_cache, v_cache, slots, k, v, k_scale, v_scale, fp8)


def _launch(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    fp8: bool,
) -> None:
    tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit the pool {tuple(k_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("the store kernel needs unit stride along head_dim and K, V pools of equal strides")
    if slots.shape != (tokens,):
        raise ValueError(f"slots has shape {tuple(slots.shape)}, expected ({tokens},)")
    kernels = importlib.import_module("radixserve.model_runner.kv_store_kernels")
    scales = (k_scale, v_scale) if fp8 else (k_cache, v_cache)  # unread without FP8
    kernels.store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slots, *scales,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        HKV=kv_heads, D=head_dim, BLOCK_H=_pow2(kv_heads), BLOCK_D=_pow2(head_dim), FP8=fp8,
        num_warps=4,
    )


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
