"""Cases and helpers shared by the Triton kernel tests (test_triton_decode.py, test_triton_group.py).

The kernels run where triton imports (conftest's `device` fixture): on the CPU under
its interpreter (TRITON_INTERPRET=1, small shapes), on a GPU in the `gpu` tests
(tests/gpu/test_gpu_triton_*.py). Every case
scatters slots at random through a pool whose unused slots hold NaN, and points
table entries past each sequence's length at those NaN slots (or out of the
pool): a kernel that reads one row it should not gives NaN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import radixserve
from radixserve.model_runner.kv_pool import dequantize_kv
from radixserve.model_runner.kv_store import FP8_MAX, quantize_kv


def make_decode_case(lens, hq, hkv, d, seed, dtype=torch.float32, device="cpu", pool_slack=64,
                     past_end="poison"):
    """q, k_cache, v_cache, page_table, seqused_k for sequences of `lens` keys.

    Slots are scattered at random; slot 0 and every unused slot hold NaN. Table
    entries past a sequence's length are NaN slots (`past_end="poison"`) or indices
    outside the pool (`"out_of_range"`), never read either way."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    num_slots = total + pool_slack
    k = torch.randn(num_slots + 1, hkv, d, generator=g)
    v = torch.randn(num_slots + 1, hkv, d, generator=g)
    perm = torch.randperm(num_slots, generator=g) + 1
    used, unused = perm[:total], torch.cat([perm[total:], torch.zeros(1, dtype=perm.dtype)])
    k[unused], v[unused] = float("nan"), float("nan")
    width = max(lens) + 23
    if past_end == "poison":
        table = unused[torch.randint(0, len(unused), (len(lens), width), generator=g)]
    else:
        table = torch.randint(num_slots + 1, 2**31 - 1, (len(lens), width), generator=g)
        table[:, ::2] = -1
    start = 0
    for i, n in enumerate(lens):
        table[i, :n] = used[start : start + n]
        start += n
    q = torch.randn(len(lens), hq, d, generator=g)
    as_dev = dict(device=device)
    return (q.to(dtype=dtype, **as_dev), k.to(dtype=dtype, **as_dev), v.to(dtype=dtype, **as_dev),
            table.to(torch.int32).to(**as_dev), torch.tensor(lens, dtype=torch.int32, **as_dev))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def compile_for_hopper(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int = 1,
                       kv_dtype: str | None = None):
    """Compile a kernel of the module for SM 9.0 on this machine (no GPU needed), with its
    pointers 16-byte aligned as the JIT specializes them at run time (so loads vectorize
    and K/V tiles go through shared memory as on the GPU). `kv_dtype` (e.g. "fp8e4nv"):
    the K and V pointers' type, where it is not `dtype`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreted: rewrap
    kv = kv_dtype or dtype
    pointers = {"Q": dtype, "K": kv, "V": kv, "Out": dtype, "PageTable": "i32", "SeqUsed": "i32",
                "CuSeqlensQ": "i32", "TableRows": "i64", "TableStart": "i64", "PartOut": "fp32", "PartLse": "fp32",
                "Lse": "fp32", "KScale": "fp32", "VScale": "fp32"}
    signature = {
        name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name in pointers
        else "fp32" if name == "scale_log2" else "i32"
        for name in fn.arg_names
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
    src = ASTSource(fn=fn, signature=signature, attrs=aligned,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def gpu_case(lens, hq, hkv, seed, num_slots=1 << 20, first_slot=1):
    """Like make_decode_case, built on the GPU in bf16: the pool's `num_slots` slots are NaN
    except the sequences' own, drawn at random from first_slot..num_slots; table
    entries past each length are slot 0 (NaN)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cuda = dict(device="cuda")
    total, d = sum(lens), 128
    k = torch.full((num_slots + 1, hkv, d), float("nan"), dtype=torch.bfloat16, **cuda)
    v = torch.full_like(k, float("nan"))
    used = torch.randperm(num_slots + 1 - first_slot, generator=g, **cuda)[:total] + first_slot
    k[used] = torch.randn(total, hkv, d, generator=g, dtype=torch.bfloat16, **cuda)
    v[used] = torch.randn(total, hkv, d, generator=g, dtype=torch.bfloat16, **cuda)
    table = torch.zeros(len(lens), max(lens) + 23, dtype=torch.int32, **cuda)
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    for i, n in enumerate(lens):
        table[i, :n] = used[starts[i] : starts[i] + n].to(torch.int32)
    q = torch.randn(len(lens), hq, d, generator=g, dtype=torch.bfloat16, **cuda)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32, **cuda)


def random_lens(batch: int, lo: int, hi: int, seed: int) -> list[int]:
    return torch.randint(lo, hi + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()


def compile_check_outside_interpreter(check, test_file: str, group: int) -> None:
    """Run `check(group)` (a Hopper compile check) here, or, under TRITON_INTERPRET (where the
    compiler is unusable in-process), in a child running `test_file` without it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        check(group)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(radixserve.__file__).parents[1])  # the child imports this radixserve
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, test_file, str(group)], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]



def dequantize_fp8(stored: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The real values an fp8 cache holds, in float32 (the pool's own dequantize_kv)."""
    return dequantize_kv(stored, scales, torch.float32)


def to_fp8_case(k: torch.Tensor, v: torch.Tensor, saturate_at: float = 2.0):
    """An fp8 cache from a case's K and V (unit-variance values): head h's values are
    scaled by (1 + h) (heads of different magnitudes), then stored with per-head scales
    k_scale[h] = saturate_at * (1 + h) / 448 (keys past `saturate_at` standard deviations
    saturate at +-448: a few percent) and v_scale 1.5 times that. A kernel that applies
    one head's scale to another's values is off by a factor. Returns k8, v8, k_scale,
    v_scale (float32 [Hkv] on the cache's device)."""
    spread = 1 + torch.arange(k.shape[1], dtype=torch.float32, device=k.device)
    k_scale = saturate_at * spread / FP8_MAX
    v_scale = 1.5 * k_scale
    k8 = quantize_kv(k.float() * spread[None, :, None], k_scale)  # the pool's write (NaN stays NaN)
    v8 = quantize_kv(v.float() * spread[None, :, None], v_scale)
    return k8, v8, k_scale, v_scale
