"""Decode attention kernels on the GPU: our Triton split-KV kernels against FlashAttention-4.

Two passes of a decode step, each against FA4 over the same pool and tables:

    decode   one query row per sequence (triton_decode.paged_decode)
    prefix   cascade's prefix pass: each group's members (one row each) against the
             group's shared prefix, unmasked, with its LSE (triton_group.paged_group_attend;
             FA4 called as fa4_backend._call calls it, causal=False, return_lse=True).
             Each case runs twice: with its G groups, and "graph-padded" as a CUDA graph
             step runs it (groups padded to one per row, G = T, the extra ones empty;
             FA4's max_seqlen_q then the row count).

For each case (heads Hq/Hkv/D, lengths, slots scattered at random through a pool of
~1M slots) prints one JSON line per kernel and config: median ms over `--iters`
back-to-back calls (CUDA events, after warm-up), K/V TB/s (each K and V byte of each
sequence's context, or each group's prefix, counted once: 2 * sum(lens) * Hkv * D *
2 bytes) and the max abs difference from FA4's output (or from our default config
where FA4 is missing; for the prefix pass also of the LSE). Then one summary line per
case: FA4, our best config (and the split count the rule picks), and their ratio.

Ours is swept in two stages to keep compiles few: split counts at the default
tile config, then tile configs (BLOCK_N, num_warps, num_stages; for the prefix pass
also BLOCK_M) at the best split count.

With `--kv-dtype fp8_e4m3` each case also runs ours over an fp8 copy of the pool
(float8_e4m3fn, per-head scales amax / 448) in the same run: the same sweep (from the
fp8 config, FP8_DECODE_CONFIG / FP8_GROUP_CONFIG, with the fp8 tile candidates added),
rows tagged "triton-fp8" whose kv_tb_s counts the fp8 bytes read (1 byte a value) and
whose max_abs_err is against the bf16 reference (the quantization error), and in the
summary: the fp8 best, the engine's configs (DECODE_CONFIG / GROUP_CONFIG
over bf16, the fp8 config over fp8, both at the rule's split count) and the speedups
of fp8 over bf16 (best over best, engine config over engine config).

    python benchmarks/decode_kernel_bench.py                 # all cases; mostly Triton compiles
    python benchmarks/decode_kernel_bench.py --quick         # fewer configs
    python benchmarks/decode_kernel_bench.py --pass prefix   # only the prefix pass
    python benchmarks/decode_kernel_bench.py --quick --kv-dtype fp8_e4m3   # fp8 against bf16
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from triton.runtime.errors import OutOfResources

from radixserve.model_runner.attention.fa4_backend import load_fa4
from radixserve.model_runner.attention.triton_decode import (
    DECODE_CONFIG,
    FP8_DECODE_CONFIG,
    KernelConfig,
    choose_num_splits,
    make_workspace,
    paged_decode,
)
from radixserve.model_runner.attention.triton_group import (
    FP8_GROUP_CONFIG,
    GROUP_CONFIG,
    GroupKernelConfig,
    choose_group_splits,
    paged_group_attend,
)
from radixserve.model_runner.kv_store import FP8_KV_DTYPE, FP8_MAX, quantize_kv

POOL_SLOTS = 1 << 20
HEADS = [(16, 8, 128), (32, 8, 128)]  # Qwen3-0.6B, Qwen3-8B
SPLITS = [1, 2, 4, 8, 16]
# (BLOCK_N, num_warps, num_stages); num_stages - 1 K/V tiles are in flight per program,
# each 2 * BLOCK_N * D * 2 bytes of shared memory (228 KB per H100 SM).
TILES = [KernelConfig(*c) for c in [
    (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2),
]]  # and the default, KernelConfig()
QUICK_TILES = [KernelConfig(64, 4, 2), KernelConfig(64, 4, 3), KernelConfig(32, 4, 4), KernelConfig(128, 8, 2)]
PREFIX_SPLITS = [1, 2, 3, 4, 8]
# (BLOCK_M, BLOCK_N, num_warps, num_stages). At BLOCK_M = 64 (a Hopper warpgroup MMA) the
# query tile sits in shared memory too: the default (64, 64, 4, 2) takes ~80 KB, two
# programs per SM (compiled for SM 9.0 with Triton 3.6 and 3.9).
GROUP_TILES = [GroupKernelConfig(*c) for c in [
    (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 3),
    (128, 64, 8, 2), (64, 128, 8, 2), (16, 64, 4, 3),
]]  # and the default, GroupKernelConfig()
QUICK_GROUP_TILES = [GroupKernelConfig(64, 32, 4, 3), GroupKernelConfig(32, 64, 4, 2), GroupKernelConfig(128, 64, 8, 2)]
# Added for an fp8 cache, whose tiles take half the shared memory of bf16 ones: longer
# tiles and deeper pipelines at the bf16 configs' bytes in flight.
FP8_TILES = [KernelConfig(*c) for c in [(128, 4, 2), (128, 4, 4), (256, 4, 2), (256, 8, 2), (256, 8, 3)]]
FP8_GROUP_TILES = [GroupKernelConfig(*c) for c in [(64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 3)]]


class Fp8Pool(NamedTuple):
    """An fp8 copy of a bf16 pool: stored = saturate(x / scale[h]) as float8_e4m3fn."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor  # [Hkv] float32
    v_scale: torch.Tensor


def to_fp8(k: torch.Tensor, v: torch.Tensor) -> Fp8Pool:
    """Per-head scales amax / 448, as a per-head calibration would choose them."""

    def one(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.abs().amax(dim=(0, 2)).float() / FP8_MAX).clamp_min(1e-12)
        stored = torch.empty(x.shape, dtype=FP8_KV_DTYPE, device=x.device)
        for i in range(0, x.shape[0], 1 << 18):  # in chunks: the float copy of a pool is 4 GB
            stored[i : i + (1 << 18)] = quantize_kv(x[i : i + (1 << 18)], scale)  # the pool's write
        return stored, scale

    k8, k_scale = one(k)
    v8, v_scale = one(v)
    return Fp8Pool(k8, v8, k_scale, v_scale)


def workloads(g: torch.Generator) -> dict[str, list[int]]:
    return {
        "256x[100,2048]": torch.randint(100, 2049, (256,), generator=g).tolist(),
        "256x1024": [1024] * 256,
        "64x4096": [4096] * 64,
        # cascade's suffix pass in the shared-prefix workload: 1,024 questions of 128 tokens plus output
        "1024x[129,385]": torch.randint(129, 386, (1024,), generator=g).tolist(),
    }


def prefix_workloads(g: torch.Generator) -> dict[str, tuple[list[int], list[int]]]:
    """Members (query rows) and shared prefix length per group."""
    return {
        # the shared-prefix benchmark's decode step: 64 prompts of 2,048 tokens, 16 questions each
        "64x16-2048": ([16] * 64, [2048] * 64),
        "256x~4-2048": (torch.randint(2, 7, (256,), generator=g).tolist(), [2048] * 256),
        # every running request behind one system prompt: one group of many row chunks
        "1x1024-2048": ([1024], [2048]),
    }


def make_inputs(lens: list[int], hq: int, hkv: int, d: int, k: torch.Tensor, v: torch.Tensor, g: torch.Generator,
                rows: int | None = None):
    """q [rows or B, Hq, D], page_table [B, max_len] int32 (distinct random slots), seqused_k [B] int32."""
    total = sum(lens)
    slots = (torch.randperm(POOL_SLOTS, generator=g)[:total] + 1).to(torch.int32)
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32)
    start = 0
    for i, n in enumerate(lens):
        table[i, :n] = slots[start : start + n]
        start += n
    q = torch.randn(len(lens) if rows is None else rows, hq, d, generator=g).to("cuda", torch.bfloat16)
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
    ap.add_argument("--pass", dest="passes", choices=["decode", "prefix", "all"], default="all")
    ap.add_argument("--kv-dtype", choices=["bf16", "fp8_e4m3"], default="bf16",
                    help="fp8_e4m3: also run ours over an fp8 copy of the pool, against bf16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernel_bench needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    fa4 = load_fa4()
    tiles = QUICK_TILES if args.quick else TILES
    group_tiles = QUICK_GROUP_TILES if args.quick else GROUP_TILES
    fp8_tiles = tiles + FP8_TILES
    fp8_group_tiles = group_tiles + FP8_GROUP_TILES
    print(json.dumps({"device": props.name, "sms": num_sms, "fa4": fa4 is not None, "pool_slots": POOL_SLOTS,
                      "kv_dtype": args.kv_dtype}))

    g = torch.Generator().manual_seed(0)
    for hq, hkv, d in HEADS:
        k = torch.randn(POOL_SLOTS + 1, hkv, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(POOL_SLOTS + 1, hkv, d, dtype=torch.bfloat16, device="cuda")
        fp8 = to_fp8(k, v) if args.kv_dtype == "fp8_e4m3" else None
        if args.passes in ("decode", "all"):
            for name, lens in workloads(g).items():
                run_case(name, lens, (hq, hkv, d), k, v, fa4, tiles, num_sms, args.iters, g, fp8, fp8_tiles)
        if args.passes in ("prefix", "all"):
            for name, (members, prefixes) in prefix_workloads(g).items():
                for padded in (False, True):
                    run_prefix_case(name, members, prefixes, padded, (hq, hkv, d), k, v, fa4, group_tiles, num_sms,
                                    args.iters, g, fp8, fp8_group_tiles)
        del k, v, fp8
        torch.cuda.empty_cache()


def run_case(name, lens, heads, k, v, fa4, tiles, num_sms, iters, g, fp8=None, fp8_tiles=()) -> None:
    hq, hkv, d = heads
    b = len(lens)
    q, table, seqused = make_inputs(lens, hq, hkv, d, k, v, g)
    scale = 1 / math.sqrt(d)
    values = 2 * sum(lens) * hkv * d  # K and V values read
    case = {"case": name, "heads": f"{hq}/{hkv}/{d}", "batch": b}

    def report(kernel: str, ms: float, out: torch.Tensor, ref: torch.Tensor | None, **extra) -> dict:
        kv_bytes = values * (1 if kernel == "triton-fp8" else k.element_size())
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

    def ours(num_splits: int, config: KernelConfig, pool: Fp8Pool | None = None) -> dict | None:
        ws = make_workspace(b, hq, d, num_splits, "cuda")
        kernel = "triton" if pool is None else "triton-fp8"
        cache = (k, v, {}) if pool is None else (pool.k, pool.v, dict(k_scale=pool.k_scale, v_scale=pool.v_scale))

        def call() -> object:
            return paged_decode(q, cache[0], cache[1], table, seqused, scale, num_splits, out=out, workspace=ws,
                                config=config, **cache[2])

        tag = dict(splits=num_splits, block_n=config.block_n, warps=config.num_warps, stages=config.num_stages)
        try:
            call()
        except OutOfResources as exc:  # a config past the SM's shared memory: report it, go on
            print(json.dumps({**case, "kernel": kernel, **tag, "error": f"{type(exc).__name__}: {exc}"[:300]}))
            return None
        nonlocal ref
        if ref is None:
            ref = out.clone()
        return report(kernel, time_ms(call, iters), out, ref, **tag)

    auto = choose_num_splits(b, hkv, num_sms)
    rows = [ours(s, KernelConfig()) for s in sorted(set(SPLITS) | {auto})]
    best_splits = min((r for r in rows if r), key=lambda r: r["ms"])["splits"]
    rows += [ours(best_splits, t) for t in tiles if t != KernelConfig()]
    best = min((r for r in rows if r), key=lambda r: r["ms"])
    fields = ("splits", "block_n", "warps", "stages", "ms", "kv_tb_s")
    summary = {**case, "summary": True, "auto_splits": auto, "best": {k_: best[k_] for k_ in fields}}
    if fa4_row is not None:
        summary["fa4_ms"] = fa4_row["ms"]
        summary["fa4_tb_s"] = fa4_row["kv_tb_s"]
        summary["speedup_vs_fa4"] = round(fa4_row["ms"] / best["ms"], 3)
    if fp8 is not None:
        engine = ours(auto, DECODE_CONFIG)
        fp8_by_splits, fp8_best = sweep_fp8(ours, sorted(set(SPLITS) | {auto}), FP8_DECODE_CONFIG, fp8_tiles, fp8)
        summary["fp8"] = fp8_summary(fields, best, fp8_best, engine, fp8_by_splits[auto])
    print(json.dumps(summary), flush=True)


def sweep_fp8(ours, splits: list[int], config, tiles, fp8) -> tuple[dict, dict]:
    """Our kernel over the fp8 pool: every split count at `config`, then the other `tiles` at
    the fastest split count. Returns the rows by split count and the fastest row."""
    by_splits = {s: ours(s, config, fp8) for s in splits}
    measured = [r for r in by_splits.values() if r]
    best_splits = min(measured, key=lambda r: r["ms"])["splits"]
    measured += [r for r in (ours(best_splits, t, fp8) for t in dict.fromkeys(tiles) if t != config) if r]
    return by_splits, min(measured, key=lambda r: r["ms"])


def fp8_summary(fields, best: dict, fp8_best: dict, engine: dict | None, fp8_engine: dict | None) -> dict:
    """The fp8 part of a case's summary: fp8's best config, and fp8 against bf16 best for
    best and at the engine's configs (the rule's splits)."""
    out = {"best": {k_: fp8_best[k_] for k_ in fields}, "speedup_vs_bf16": round(best["ms"] / fp8_best["ms"], 3),
           "max_abs_err_vs_bf16": fp8_best.get("max_abs_err")}
    if engine is not None and fp8_engine is not None:
        out["engine_bf16_ms"] = engine["ms"]
        out["engine_fp8_ms"] = fp8_engine["ms"]
        out["engine_fp8_tb_s"] = fp8_engine["kv_tb_s"]
        out["engine_speedup_vs_bf16"] = round(engine["ms"] / fp8_engine["ms"], 3)
    return out


def run_prefix_case(name, members, prefixes, padded, heads, k, v, fa4, tiles, num_sms, iters, g, fp8=None,
                    fp8_tiles=()) -> None:
    """Cascade's prefix pass over groups of `members` rows and `prefixes` keys; `padded` as a
    graph step: one group per row (G = T), those past the real ones with no rows, no keys."""
    hq, hkv, d = heads
    rows = sum(members)
    q, table, seqused = make_inputs(prefixes, hq, hkv, d, k, v, g, rows=rows)
    cu = torch.tensor([0, *torch.tensor(members).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    if padded:
        extra = rows - len(members)
        table = torch.cat([table, torch.zeros(extra, table.shape[1], dtype=torch.int32, device="cuda")])
        seqused = torch.cat([seqused, torch.zeros(extra, dtype=torch.int32, device="cuda")])
        cu = torch.cat([cu, torch.full((extra,), rows, dtype=torch.int32, device="cuda")])
    groups = len(seqused)
    max_rows = rows if padded else max(members)  # graph_cascade_metadata's max_seqlen_q is the row count
    scale = 1 / math.sqrt(d)
    values = 2 * sum(prefixes) * hkv * d  # K and V values read
    case = {"case": f"prefix {name}" + (" graph-padded" if padded else ""), "heads": f"{hq}/{hkv}/{d}",
            "rows": rows, "groups": groups}

    def report(kernel: str, ms: float, out, lse, ref, **extra) -> dict:
        kv_bytes = values * (1 if kernel == "triton-fp8" else k.element_size())
        row = {**case, "kernel": kernel, **extra, "ms": round(ms, 4), "kv_tb_s": round(kv_bytes / ms / 1e9, 3)}
        if ref is not None:
            row["max_abs_err"] = float((out.float() - ref[0].float()).abs().max())
            row["max_lse_err"] = float((lse - ref[1]).abs().max())
        print(json.dumps(row), flush=True)
        return row

    ref = None
    fa4_row = None
    if fa4 is not None:

        def call_fa4():
            return fa4(q, k.unsqueeze(1), v.unsqueeze(1), cu_seqlens_q=cu, max_seqlen_q=max_rows,
                       max_seqlen_k=table.shape[1], seqused_k=seqused, page_table=table,
                       softmax_scale=scale, causal=False, return_lse=True)

        fa4_out, fa4_lse = call_fa4()
        ref = (fa4_out.clone(), fa4_lse.clone())
        fa4_row = report("fa4", time_ms(call_fa4, iters), fa4_out, fa4_lse, None)

    out = torch.empty_like(q)

    def ours(num_splits: int, config: GroupKernelConfig, pool: Fp8Pool | None = None) -> dict | None:
        ws = make_workspace(rows, hq, d, num_splits, "cuda")
        kernel = "triton" if pool is None else "triton-fp8"
        cache = (k, v, {}) if pool is None else (pool.k, pool.v, dict(k_scale=pool.k_scale, v_scale=pool.v_scale))

        def call() -> object:
            return paged_group_attend(q, cache[0], cache[1], table, seqused, cu, scale, num_splits, out=out,
                                      workspace=ws, return_lse=True, config=config, **cache[2])

        tag = dict(splits=num_splits, block_m=config.block_m, block_n=config.block_n, warps=config.num_warps,
                   stages=config.num_stages)
        try:
            _, lse = call()
        except OutOfResources as exc:  # a config past the SM's shared memory: report it, go on
            print(json.dumps({**case, "kernel": kernel, **tag, "error": f"{type(exc).__name__}: {exc}"[:300]}))
            return None
        nonlocal ref
        if ref is None:
            ref = (out.clone(), lse.clone())
        return report(kernel, time_ms(call, iters), out, lse, ref, **tag)

    default = GroupKernelConfig()
    auto = choose_group_splits(rows, groups, hq, hkv, num_sms, default)
    by_splits = {s: ours(s, default) for s in sorted(set(PREFIX_SPLITS) | {auto})}
    measured = [r for r in by_splits.values() if r]
    best_splits = min(measured, key=lambda r: r["ms"])["splits"]
    measured += [r for r in (ours(best_splits, t) for t in tiles if t != default) if r]
    best = min(measured, key=lambda r: r["ms"])
    fields = ("splits", "block_m", "block_n", "warps", "stages", "ms", "kv_tb_s")
    summary = {**case, "summary": True, "auto_splits": auto, "best": {k_: best[k_] for k_ in fields}}
    if by_splits[auto] is not None:
        summary["auto_ms"] = by_splits[auto]["ms"]
    if fa4_row is not None:
        summary["fa4_ms"] = fa4_row["ms"]
        summary["fa4_tb_s"] = fa4_row["kv_tb_s"]
        summary["speedup_vs_fa4"] = round(fa4_row["ms"] / best["ms"], 3)
        if by_splits[auto] is not None:
            summary["auto_speedup_vs_fa4"] = round(fa4_row["ms"] / by_splits[auto]["ms"], 3)
    if fp8 is not None:
        engine_auto = choose_group_splits(rows, groups, hq, hkv, num_sms, GROUP_CONFIG)
        engine = ours(engine_auto, GROUP_CONFIG)
        fp8_auto = choose_group_splits(rows, groups, hq, hkv, num_sms, FP8_GROUP_CONFIG)
        fp8_by_splits, fp8_best = sweep_fp8(
            ours, sorted(set(PREFIX_SPLITS) | {fp8_auto}), FP8_GROUP_CONFIG, fp8_tiles, fp8
        )
        summary["fp8"] = fp8_summary(fields, best, fp8_best, engine, fp8_by_splits[fp8_auto])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
