"""Offline throughput on nano-vllm's workload, with transformers as the peer in the same run.

Workload (nano-vllm bench.py): 256 sequences, prompts of random token ids with
lengths uniform in [100, 1024], output lengths uniform in [100, 1024],
temperature 0.6, ignore_eos. The model is a Qwen3 shape with random weights
(speed depends on shapes only) unless --model names a checkpoint.

Prints one JSON line: output tokens/s; transformers' `generate` (static
batching) on a subset, and our engine on that same subset, as a ratio; and the
memory-bandwidth floor of the decode phase (weights plus every active
sequence's K/V read once per step, summed over the run, over a device-to-device
copy's measured bandwidth) with the fraction of it achieved.
--profile-steps N adds a decode-step breakdown (torch.profiler, see profile_decode).

    python benchmarks/throughput.py                       # Qwen3-0.6B shape on cuda
    python benchmarks/throughput.py --shape qwen3-8b --hf-seqs 16
    python benchmarks/throughput.py --no-cuda-graphs       # eager decode (graphs are the engine's default)
    python benchmarks/throughput.py --shape tiny --device cpu --dtype float32 --num-seqs 4 \\
        --input-len 10 20 --output-len 5 10 --hf-seqs 2 --hf-new-tokens 4   # smoke test
"""

from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from _workloads import (
    add_engine_args,
    engine_kwargs,
    Seq, Timer, decode_floor, emit, environment, free_memory, kv_bytes_per_token,
    measure_bandwidth_gbs, measure_matmul_tflops, model_bytes, nano_vllm_workload, prefill_floor_s,
    random_checkpoint,
)
from radixserve import Engine, SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--hf-seqs", type=int, default=32, help="transformers runs the first N sequences (0: skip)")
    p.add_argument("--hf-new-tokens", type=int, default=256, help="output tokens per sequence in the peer run")
    p.add_argument("--bandwidth-gbs", type=float, help="skip measuring; use this bandwidth")
    p.add_argument("--profile-steps", type=int, default=0, help="also profile this many decode steps")
    p.add_argument("--profile-only", action="store_true", help="skip the timed runs; profile only")
    p.add_argument("--trace", help="write the profiled steps' chrome trace here (.json.gz)")
    return p.parse_args()


def run_hf(ckpt: Path, seqs: list[Seq], new_tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """transformers `generate`, one left-padded batch, sampling at T=0.6, EOS suppressed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=DTYPES[args.dtype]).to(args.device).eval()
    width = max(len(s.prompt) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
        mask[i, width - len(s.prompt) :] = 1
    ids, mask = ids.to(args.device), mask.to(args.device)
    kw = dict(do_sample=True, temperature=0.6, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        with Timer() as t:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    generated = (out.shape[1] - width) * len(seqs)
    del model, out
    free_memory()
    return {"seqs": len(seqs), "new_tokens": new_tokens, "time_s": t.seconds, "tok_s": generated / t.seconds}


def generate(engine: Engine, seqs: list[Seq], max_tokens: int | None = None) -> tuple[float, int]:
    """Seconds and output tokens for the whole list, submitted at once."""
    params = [
        SamplingParams(max_tokens=max_tokens or s.output_len, temperature=0.6, ignore_eos=True, seed=i)
        for i, s in enumerate(seqs)
    ]
    with Timer() as t:
        outs = engine.generate([s.prompt for s in seqs], params, progress=False)
    return t.seconds, sum(len(o.token_ids) for o in outs)


def warm_up(engine: Engine, seqs: list[Seq]) -> None:
    """Compile every kernel shape the run will meet (prefill, extend, decode) before timing."""
    generate(engine, seqs[:8], max_tokens=8)
    engine.flush_cache()


def run_ours(ckpt: Path, seqs: list[Seq], hf_subset: list[Seq], args: argparse.Namespace) -> dict[str, Any]:
    with Timer() as start:  # weights, KV pool, kernel compilation, CUDA-graph capture
        engine = Engine(str(ckpt), **engine_kwargs(args))
        warm_up(engine, seqs)
    try:
        core = engine.core
        steps0 = core.stats()["steps"]
        seconds, out_tokens = generate(engine, seqs)
        steps = core.stats()["steps"] - steps0
        result: dict[str, Any] = {
            "backend": core.runner.backend.name,
            "fused_kernels": core.runner.model.kernels.compiled,
            "overlap_schedule": core.overlap,
            "start_s": start.seconds,
            "cuda_graphs": engine.core.runner.graphs is not None,
            "kv_capacity_tokens": core.kv_capacity,
            "time_s": seconds,
            "output_tokens": out_tokens,
            "output_tok_s": out_tokens / seconds,
            "total_tok_s": (out_tokens + sum(len(s.prompt) for s in seqs)) / seconds,
            "steps": steps,
            "ms_per_step": 1e3 * seconds / steps,
            "retractions": core.stats()["retractions"],
        }
        if hf_subset:
            engine.flush_cache()
            sub_s, sub_tokens = generate(engine, hf_subset, max_tokens=args.hf_new_tokens)
            result["same_subset_tok_s"] = sub_tokens / sub_s
        result["weight_bytes"], result["weight_bytes_per_step"] = model_bytes(core.runner.model)
        result["kv_bytes_per_token"] = kv_bytes_per_token(core.runner.model_config, core.runner.dtype)
        result["_config"] = core.runner.model_config
    finally:
        engine.shutdown()
        del engine, core
        free_memory()
    return result


# -- decode-step profile -------------------------------------------------------------------------


def _categorize(kernel: str) -> str:
    k = kernel.lower()
    if "flash" in k or "fmha" in k or "attention" in k:
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "xmma", "cublas", "cutlass", "splitk")):
        return "gemm"
    if "memcpy" in k or "memset" in k:
        return "memcpy/memset"
    if k.startswith("triton_"):  # Inductor's names: triton_per_fused_..., triton_poi_fused_...
        return "fused (torch.compile)"
    if "triton" in k or "gumbel" in k or "argmax" in k or "sample" in k:
        return "sampler"
    if any(s in k for s in ("index", "gather", "scatter", "put_", "catarray", "cat_")):
        return "index/gather/cat"
    if "reduce" in k or "softmax" in k:
        return "reductions"
    return "elementwise (norms, rope, silu, casts)"


def profile_decode(ckpt: Path, seqs: list[Seq], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill the workload, then time decode steps of `EngineCore.step`: first with a sync
    after each phase (schedule, forward, sampling rows, sample, process), then free-running,
    then under torch.profiler (kernel time by category, host syncs, GPU busy fraction)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from radixserve.engine.config import EngineConfig
    from radixserve.engine.core import EngineCore
    from radixserve.scheduler.request import Req

    free_memory()  # the caching allocator still holds the last engine's pool
    core = EngineCore(EngineConfig(**engine_kwargs(args)), ckpt)
    sched, runner = core.scheduler, core.runner
    core.add([
        Req(f"p{i}", s.prompt, SamplingParams(max_tokens=s.output_len, temperature=0.6, ignore_eos=True), seed=i)
        for i, s in enumerate(seqs)
    ])
    while sched.waiting or any(r.kv_len < len(r.prompt_ids) for r in sched.running):
        core.step()
    for _ in range(3):
        core.step()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    phases: dict[str, list[float]] = defaultdict(list)
    state = {"sync_each_phase": False}

    def instrument(obj: Any, method: str, label: str) -> None:
        # Wraps the bound method on the instance, so EngineCore.step runs as it is.
        fn = getattr(obj, method)

        def wrapped(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            with record_function(f"rs::{label}"):
                result = fn(*a, **kw)
            if state["sync_each_phase"]:
                sync()
                phases[label].append(1e3 * (time.perf_counter() - start))
            return result

        setattr(obj, method, wrapped)

    for obj, method, label in [
        (sched, "schedule", "schedule"), (sched, "schedule_ahead", "schedule_ahead"), (runner, "forward", "forward"),
        (sched, "sampling_rows", "sampling_rows"), (runner, "sample", "sample"), (sched, "process", "process"),
    ]:
        instrument(obj, method, label)
    n = args.profile_steps
    state["sync_each_phase"] = True
    for _ in range(n):
        core.step()
    state["sync_each_phase"] = False
    with Timer() as free_run:
        for _ in range(n):
            core.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        with Timer() as profiled:
            for _ in range(n):
                core.step()
    kernels: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    syncs = launches = 0
    for ev in prof.key_averages():
        if ev.key.startswith("rs::"):  # our annotations also show up as GPU ranges: not kernels
            continue
        dev_ms = (getattr(ev, "self_device_time_total", 0.0) or 0.0) / 1e3 / n
        if ev.device_type == torch.autograd.DeviceType.CUDA and dev_ms > 0:
            kernels[_categorize(ev.key)] += dev_ms
            top.append((dev_ms, ev.key[:90]))
        if ev.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += ev.count
        if ev.key.startswith("cudaLaunchKernel"):
            launches += ev.count
    if args.trace:
        raw = Path(args.trace).with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(args.trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    gpu_ms = sum(kernels.values())
    return {
        "batch_size": len(sched.running),
        "context_tokens": sum(r.kv_len for r in sched.running),
        "step_ms": 1e3 * free_run.seconds / n,
        "step_ms_profiled": 1e3 * profiled.seconds / n,
        "synced_phase_ms": {k: sorted(v)[len(v) // 2] for k, v in phases.items()},
        "gpu_kernel_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
        "gpu_busy_fraction": gpu_ms / (1e3 * profiled.seconds / n),
        "host_syncs_per_step": syncs / n,
        "kernel_launches_per_step": launches / n,
        "top_kernels_ms": [f"{ms:.3f} {name}" for ms, name in sorted(top, reverse=True)[:12]],
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("radixserve.model_runner.attention").setLevel(logging.INFO)
    record: dict[str, Any] = {"bench": "throughput", "shape": args.model or args.shape, **environment(args.device)}
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs(args.device)
    tflops = measure_matmul_tflops(args.device)
    record.update(bandwidth_gbs=bandwidth, matmul_tflops=tflops)
    ckpt = Path(args.model) if args.model else random_checkpoint(
        args.shape, args.ckpt_dir or f"/tmp/radixserve-{args.shape}", args.device, seed=args.seed
    )
    seqs = nano_vllm_workload(args.num_seqs, args.seed, tuple(args.input_len), tuple(args.output_len))
    if args.profile_only:
        emit({"bench": "decode_profile", "shape": args.model or args.shape, **profile_decode(ckpt, seqs, args)})
        return
    subset = seqs[: args.hf_seqs]
    record["workload"] = {
        "num_seqs": len(seqs), "prompt_tokens": sum(len(s.prompt) for s in seqs),
        "output_tokens": sum(s.output_len for s in seqs), "input_len": args.input_len,
        "output_len": args.output_len, "temperature": 0.6, "ignore_eos": True,
    }
    if subset:
        record["transformers"] = run_hf(ckpt, subset, args.hf_new_tokens, args)
    ours = run_ours(ckpt, seqs, subset, args)
    config = ours.pop("_config")
    record["radixserve"] = ours
    if subset:
        record["ratio_vs_transformers_same_subset"] = ours["same_subset_tok_s"] / record["transformers"]["tok_s"]
        record["ratio_full_run_vs_transformers_subset"] = ours["output_tok_s"] / record["transformers"]["tok_s"]
    kv_tok = ours["kv_bytes_per_token"]
    w_step = ours["weight_bytes_per_step"]
    ideal = decode_floor(seqs, w_step, kv_tok, bandwidth)
    actual_steps = decode_floor(seqs, w_step, kv_tok, bandwidth, steps=ours["steps"])
    matmul_params = w_step // torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    prefill = prefill_floor_s(seqs, matmul_params, config, tflops)
    floor_s = ideal["floor_s"] + prefill
    record["floor"] = {
        "decode_memory_floor": ideal, "decode_floor_at_our_step_count": actual_steps,
        "prefill_compute_floor_s": prefill, "floor_s": floor_s,
        "achieved_fraction": floor_s / ours["time_s"],
    }
    emit(record)
    if args.profile_steps:
        emit({"bench": "decode_profile", "shape": record["shape"], **profile_decode(ckpt, seqs, args)})


if __name__ == "__main__":
    main()
