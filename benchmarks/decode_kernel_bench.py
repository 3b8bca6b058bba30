"""Decode attention kernels on the GPU: our Triton split-KV kernel against FlashAttention-4.

For each case (heads Hq/Hkv/D, a batch of context lengths, slots scattered at
random through a pool of ~1M slots) prints one JSON line per kernel and config:
median ms over `--iters` back-to-back calls (CUDA events, after warm-up), K/V
TB/s (each K and V byte of each sequence's context counted once:
2 * sum(lens) * Hkv * D * 2 bytes) and the max abs difference from FA4's output
(or from our default config where FA4 is missing). Then one summary line per
case: FA4, our best config, and their ratio.

Ours is swept in two stages to keep compiles few: split counts at the default
tile config, then tile configs (BLOCK_N, num_warps, num_stages) at the best split count.

    python benchmarks/decode_kernel_bench.py            # all cases; mostly Triton compiles
    python benchmarks/decode_kernel_bench.py --quick    # fewer configs
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Callable

import torch
from triton.runtime.errors import OutOfResources

from radixserve.model_runner.attention.fa4_backend import load_fa4
from radixserve.model_runner.attention.triton_decode import (
    KernelConfig,
    choose_num_splits,
    make_workspace,
    paged_decode,
)

POOL_SLOTS = 1 << 20
HEADS = [(16, 8, 128), (32, 8, 128)]  # Qwen3-0.6B, Qwen3-8B
SPLITS = [1, 2, 4, 8, 16]
# (BLOCK_N, num_warps, num_stages); num_stages - 1 K/V tiles are in flight per program,
# each 2 * BLOCK_N * D * 2 bytes of shared memory (228 KB per H100 SM).
TILES = [KernelConfig(*c) for c in [
    (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2),
]]  # and the default, KernelConfig()
QUICK_TILES = [KernelConfig(64, 4, 2), KernelConfig(64, 4, 3), KernelConfig(32, 4, 4), KernelConfig(128, 8, 2)]


def workloads(g: torch.Generator) -> dict[str, list[int]]:
    return {
        "256x[100,2048]": torch.randint(100, 2049, (256,), generator=g).tolist(),
        "256x1024": [1024] * 256,
        "64x4096": [4096] * 64,
        # cascade's suffix pass in the shared-prefix workload: 1,024 questions of 128 tokens plus output
        "1024x[129,385]": torch.randint(129, 386, (1024,), generator=g).tolist(),
    }


def make_inputs(lens: list[int], hq: int, hkv: int, d: int, k: torch.Tensor, v: torch.Tensor, g: torch.Generator):
    """q, page_table [B, max_len] int32 (distinct random slots), seqused_k [B] int32."""
    total = sum(lens)
    slots = (torch.randperm(POOL_SLOTS, generator=g)[:total] + 1).to(torch.int32)
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32)
    start = 0
    for i, n in enumerate(lens):
        table[i, :n] = slots[start : start + n]
        start += n
    q = torch.randn(len(lens), hq, d, generator=g).to("cuda", torch.bfloat16)
    return q, table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 10) -> float:
    """Median ms of `iters` calls enqueued back to back (the host runs ahead of the GPU)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[iters // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer tile configs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernel_bench needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    fa4 = load_fa4()
    tiles = QUICK_TILES if args.quick else TILES
    print(json.dumps({"device": props.name, "sms": num_sms, "fa4": fa4 is not None, "pool_slots": POOL_SLOTS}))

    g = torch.Generator().manual_seed(0)
    for hq, hkv, d in HEADS:
        k = torch.randn(POOL_SLOTS + 1, hkv, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(POOL_SLOTS + 1, hkv, d, dtype=torch.bfloat16, device="cuda")
        for name, lens in workloads(g).items():
            run_case(name, lens, (hq, hkv, d), k, v, fa4, tiles, num_sms, args.iters, g)
        del k, v
        torch.cuda.empty_cache()


def run_case(name, lens, heads, k, v, fa4, tiles, num_sms, iters, g) -> None:
    hq, hkv, d = heads
    b = len(lens)
    q, table, seqused = make_inputs(lens, hq, hkv, d, k, v, g)
    scale = 1 / math.sqrt(d)
    kv_bytes = 2 * sum(lens) * hkv * d * k.element_size()
    case = {"case": name, "heads": f"{hq}/{hkv}/{d}", "batch": b}

    def report(kernel: str, ms: float, out: torch.Tensor, ref: torch.Tensor | None, **extra) -> dict:
        row = {**case, "kernel": kernel, **extra, "ms": round(ms, 4), "kv_tb_s": round(kv_bytes / ms / 1e9, 3)}
        if ref is not None:
            row["max_abs_err"] = float((out.float() - ref.float()).abs().max())
        print(json.dumps(row), flush=True)
        return row

    ref = None
    fa4_row = None
    if fa4 is not None:
        cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")

        def call_fa4():
            return fa4(q, k.unsqueeze(1), v.unsqueeze(1), cu_seqlens_q=cu_q, max_seqlen_q=1,
                       max_seqlen_k=table.shape[1], seqused_k=seqused, page_table=table,
                       softmax_scale=scale, causal=True, return_lse=False)[0]

        ref = call_fa4().clone()
        fa4_row = report("fa4", time_ms(call_fa4, iters), ref, None)

    out = torch.empty_like(q)

    def ours(num_splits: int, config: KernelConfig) -> dict | None:
        ws = make_workspace(b, hq, d, num_splits, "cuda")
        call = lambda: paged_decode(q, k, v, table, seqused, scale, num_splits, out=out, workspace=ws, config=config)
        tag = dict(splits=num_splits, block_n=config.block_n, warps=config.num_warps, stages=config.num_stages)
        try:
            call()
        except OutOfResources as exc:  # a config past the SM's shared memory: report it, go on
            print(json.dumps({**case, "kernel": "triton", **tag, "error": f"{type(exc).__name__}: {exc}"[:300]}))
            return None
        nonlocal ref
        if ref is None:
            ref = out.clone()
        return report("triton", time_ms(call, iters), out, ref, **tag)

    auto = choose_num_splits(b, hkv, num_sms)
    rows = [ours(s, KernelConfig()) for s in sorted(set(SPLITS) | {auto})]
    best_splits = min((r for r in rows if r), key=lambda r: r["ms"])["splits"]
    rows += [ours(best_splits, t) for t in tiles if t != KernelConfig()]
    best = min((r for r in rows if r), key=lambda r: r["ms"])
    summary = {**case, "summary": True, "auto_splits": auto, "best": {k_: best[k_] for k_ in
               ("splits", "block_n", "warps", "stages", "ms", "kv_tb_s")}}
    if fa4_row is not None:
        summary["fa4_ms"] = fa4_row["ms"]
        summary["fa4_tb_s"] = fa4_row["kv_tb_s"]
        summary["speedup_vs_fa4"] = round(fa4_row["ms"] / best["ms"], 3)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
