"""The Triton kernel that writes a step's new K/V into the pool (imported only when triton is present).

    store kernel   grid (T,). Program t copies token t's K and V rows `[Hkv, D]` to slot
                   `slots[t]` of the pool; with an fp8 pool it stores
                   saturate(x / scale[h]) as e4m3 (the pool's `k_scale` / `v_scale`).

One program moves both tensors of one token: a decode step's few hundred tokens and a
prefill's sixteen thousand are one launch each, where an indexed assignment per tensor
(`cache[slots] = k`) is two launches of a kernel that computes an offset per element.
Offsets into the pool are computed in int64 (slot * stride can pass 2^31).

The fp8 value is rounded to the e4m3 grid in fp32 (round to nearest even) before the cast,
so the cast itself is exact: the hardware's rounding and the interpreter's (which rounds
half up and drops the carry into the exponent) then give the same bytes as torch's cast.
"""

from __future__ import annotations

import triton
import triton.language as tl

from radixserve.model_runner.kv_store import FP8_MAX

FP8_E4M3_MAX = tl.constexpr(FP8_MAX)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6; below it e4m3 steps by 2^-9
SUBNORMAL_ROUNDER = tl.constexpr(24576.0)  # 1.5 * 2^14: fp32's step between 2^14 and 2^15 is 2^-9


@triton.jit
def round_to_e4m3(y):
    """fp32 y (|y| <= 448) rounded to the nearest e4m3 value, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    # Keep 3 of fp32's 23 mantissa bits: add just under half of the dropped 20 bits' range,
    # plus the kept lowest bit (ties to even), then clear them; a carry reaches the exponent.
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(y) + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER
    subnormal = tl.where(bits < 0, -magnitude, magnitude)  # the sign bit: -0.0 stays -0.0, as in torch
    return tl.where(tl.abs(y) < E4M3_MIN_NORMAL, subnormal, normal)


@triton.jit
def quantize_e4m3(x, scale):
    """saturate(x / scale) on the e4m3 grid, in fp32; the division IEEE-rounded (div_rn), as torch's."""
    scaled = tl.math.div_rn(x.to(tl.float32), scale)
    return round_to_e4m3(tl.minimum(tl.maximum(scaled, -FP8_E4M3_MAX), FP8_E4M3_MAX))


@triton.jit
def store_kv_kernel(
    K, V, KCache, VCache, Slots, KScale, VScale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < HKV) & (dims < D)
    k = tl.load(K + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(V + t * stride_vt + heads * stride_vh + dims, mask=mask)
    if FP8:
        k_scale = tl.load(KScale + heads, mask=heads < HKV, other=1.0)
        v_scale = tl.load(VScale + heads, mask=heads < HKV, other=1.0)
        k = quantize_e4m3(k, k_scale)
        v = quantize_e4m3(v, v_scale)
    offsets = slot * stride_ct + heads * stride_ch + dims
    tl.store(KCache + offsets, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + offsets, v.to(VCache.dtype.element_ty), mask=mask)
