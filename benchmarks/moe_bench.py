"""One Qwen3-MoE block against the dense SwiGLU of equal active parameters, and the expert work folding saves.

Part 1 (block): a SparseMoeBlock of `--shape` (default Qwen3-30B-A3B's: H 2048, 128 experts
of 768, top 8) with random weights, timed forward at each token count for both expert
implementations (`grouped_mm`, `loop`), against `SwiGLUMLP(H, top_k * moe_intermediate_size)`,
the dense MLP with the same active parameters and flops per token. Also timed: the expert
GEMMs alone (rows already sorted by expert), so routing/permute overhead shows separately.
CUDA events, warm-up, median of repeats. Before timing, on the device: the backend `auto`
resolves to, and grouped_mm's output against the loop's.

Part 2 (fold): an Engine on a small random MoE checkpoint embeds a batch of prompts sharing
a long prefix, once with fold_mode "tree" and once "off" (prefix cache off, one prefill step),
and reports `model.moe_stats()["routed_tokens"]` for each.

One JSON line per measurement.

    python benchmarks/moe_bench.py                                     # cuda, bf16
    python benchmarks/moe_bench.py --device cpu --dtype float32 --shape tiny-moe \\
        --tokens 16 64 --repeats 3 --backends loop                     # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from _workloads import SHAPES, emit, environment, free_memory, random_checkpoint

from radixserve.model_runner.models.layers import SwiGLUMLP
from radixserve.model_runner.models.moe import (
    SparseMoeBlock,
    experts_grouped_mm,
    experts_loop,
    group_by_expert,
    resolve_moe_backend,
    route,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXPERTS = {"grouped_mm": experts_grouped_mm, "loop": experts_loop}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    moe_shapes = sorted(name for name, shape in SHAPES.items() if "num_experts" in shape)
    p.add_argument("--shape", default="qwen3-30b-a3b-8l", choices=moe_shapes)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    p.add_argument("--backends", nargs="+", default=["grouped_mm", "loop"], choices=sorted(EXPERTS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--fold-shape", default="tiny-moe", choices=moe_shapes)
    p.add_argument("--fold-prompts", type=int, default=16)
    p.add_argument("--fold-prefix", type=int, default=512, help="shared prefix tokens")
    p.add_argument("--fold-suffix", type=int, default=32, help="distinct tokens after the prefix")
    p.add_argument("--skip-block", action="store_true")
    p.add_argument("--skip-fold", action="store_true")
    return p.parse_args()


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def random_block(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> SparseMoeBlock:
    h, i, e = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"]
    block = SparseMoeBlock(h, i, e, shape["num_experts_per_tok"], shape["norm_topk_prob"], dtype).to(device)
    with torch.no_grad():
        for param in (block.gate.weight, block.w_gate_up, block.w_down):
            param.normal_(0.0, 0.02)
    return block


def random_dense(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> SwiGLUMLP:
    """The dense SwiGLU with the block's active parameters: intermediate top_k * I."""
    mlp = SwiGLUMLP(shape["hidden_size"], shape["num_experts_per_tok"] * shape["moe_intermediate_size"], False, dtype)
    mlp = mlp.to(device)
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0.0, 0.02)
    return mlp


def check_backends(block: SparseMoeBlock, device: torch.device, dtype: torch.dtype, backends: list[str]) -> None:
    """What `auto` picks here, and grouped_mm's output against the loop's on one batch."""
    record: dict[str, Any] = {"bench": "moe_backend_check", "device": str(device), "dtype": str(dtype)}
    record["auto_resolves_to"] = resolve_moe_backend(
        "auto", device, dtype, block.w_down.shape[1], block.w_down.shape[2]
    )
    x = torch.randn(512, block.w_down.shape[1], device=device, dtype=dtype)
    outs = {}
    with torch.inference_mode():
        for name in backends:
            block.backend = name
            outs[name] = block(x).float()
    if len(outs) == 2:
        a, b = outs["grouped_mm"], outs["loop"]
        record["max_abs_diff_grouped_vs_loop"] = (a - b).abs().max().item()
        record["max_rel_diff_grouped_vs_loop"] = ((a - b).norm() / b.norm()).item()
    block.expert_tokens.zero_()
    emit(record)


def bench_block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    shape = SHAPES[args.shape]
    block, dense = random_block(shape, device, dtype), random_dense(shape, device, dtype)
    check_backends(block, device, dtype, args.backends)
    h, k = shape["hidden_size"], shape["num_experts_per_tok"]
    active = 3 * h * k * shape["moe_intermediate_size"]  # expert weights one token uses
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device=device, dtype=dtype)
        flops = 2 * tokens * active
        record: dict[str, Any] = {"bench": "moe_block", "shape": args.shape, "tokens": tokens, "dtype": args.dtype}
        with torch.inference_mode():
            record["dense_ms"] = median_ms(partial(dense, x), device, args.warmup, args.repeats)
            # Rows as the block's experts see them: routed, sorted by expert, gathered.
            routing = route(block.gate(x), k, block.renormalize)
            groups = group_by_expert(routing.expert_ids, block.num_experts)
            xs = x.index_select(0, groups.order // k)
            record["experts_active"] = int((groups.counts > 0).sum().item())
            for name in args.backends:
                block.backend = name
                record[f"moe_{name}_ms"] = median_ms(partial(block, x), device, args.warmup, args.repeats)
                record[f"experts_{name}_ms"] = median_ms(
                    partial(EXPERTS[name], xs, groups, block.w_gate_up, block.w_down), device, args.warmup,
                    args.repeats,
                )
                record[f"ratio_moe_{name}_vs_dense"] = record[f"moe_{name}_ms"] / record["dense_ms"]
                record[f"ratio_experts_{name}_vs_dense"] = record[f"experts_{name}_ms"] / record["dense_ms"]
                record[f"experts_{name}_tflops"] = flops / record[f"experts_{name}_ms"] / 1e9
        record["dense_tflops"] = flops / record["dense_ms"] / 1e9
        block.expert_tokens.zero_()
        emit(record)


def bench_fold(args: argparse.Namespace) -> None:
    """routed_tokens of one shared-prefix embed batch with folding on (tree) and off."""
    from radixserve import Engine

    shape = SHAPES[args.fold_shape]
    gen = torch.Generator().manual_seed(0)
    vocab = min(shape["vocab_size"], 10000)
    prefix = torch.randint(0, vocab, (args.fold_prefix,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, vocab, (args.fold_suffix,), generator=gen).tolist()
               for _ in range(args.fold_prompts)]
    tokens = sum(len(p) for p in prompts)
    record: dict[str, Any] = {
        "bench": "moe_fold", "shape": args.fold_shape, "prompts": len(prompts), "prefix": args.fold_prefix,
        "suffix": args.fold_suffix, "prompt_tokens": tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.fold_shape, tmp, args.device)
        for mode in ("tree", "off"):
            engine = Engine(
                str(ckpt), device=args.device, dtype=args.dtype, fold_mode=mode, enable_prefix_cache=False,
                max_prefill_tokens=tokens, max_running_requests=len(prompts), show_progress=False,
                kv_cache_tokens=2 * tokens,  # a fixed pool: the default takes 85% of what is free
            )
            try:
                model = engine.core.runner.model
                record["moe_backend"] = model.moe_backend
                model.reset_moe_stats()
                engine.embed(prompts)
                stats = model.moe_stats()
                record[f"{mode}_moe_tokens"] = stats["moe_tokens"]
                record[f"{mode}_routed_tokens"] = stats["routed_tokens"]
            finally:
                engine.shutdown()
                del engine  # the pool lives as long as the engine object
                free_memory()
    record["routed_saved_fraction"] = 1 - record["tree_routed_tokens"] / record["off_routed_tokens"]
    emit(record)


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    emit({"bench": "moe_bench", **environment(args.device)})
    if not args.skip_block:
        bench_block(args, device, dtype)
        free_memory()  # the block's weights and activations, before the engines size their pools
    if not args.skip_fold:
        bench_fold(args)


if __name__ == "__main__":
    main()
