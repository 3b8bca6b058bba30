"""Shared pieces of the GPU benchmarks: model shapes, random checkpoints, workloads, device ceilings.

Nothing here downloads anything: a shape becomes a checkpoint of random
weights (transformers' own init, fixed seed) written once into a directory.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import random
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from radixserve import SamplingParams

# transformers Qwen3Config (Qwen3MoeConfig with num_experts) arguments. Random weights: speed depends on shapes only.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
    "qwen3-8b": dict(
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # A small model for CPU measurements (fold_bench's CPU numbers).
    "cpu-small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=768, vocab_size=32000, tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # Qwen3-30B-A3B with 8 of its 48 layers (every MLP sparse: 128 experts, top 8). With
    # num_experts a shape becomes a Qwen3MoeConfig (random_checkpoint).
    "qwen3-30b-a3b-8l": dict(
        hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, vocab_size=151936,
        tie_word_embeddings=False, max_position_embeddings=40960,
    ),
    # The dense peer of qwen3-30b-a3b-8l: the same attention and equal active parameters per
    # token (one SwiGLU of 8 experts x 768 = 6144).
    "dense-a3b-8l": dict(
        hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # For smoke-testing the MoE scripts on a CPU.
    "tiny-moe": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, vocab_size=12000,
        tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    # Host-overhead measurements on a CPU (host_overhead.py): the model and vocabulary are kept
    # small so that the forward and the sampler's tensor work, which a GPU does, stay cheap.
    "tiny-host": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    # For smoke-testing the scripts on a CPU.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=12000, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model and engine options the GPU benchmarks share."""
    p.add_argument("--model", help="a Hugging Face checkpoint dir; default: random weights of --shape")
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--ckpt-dir", help="where the random checkpoint is written (default /tmp/radixserve-<shape>)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode eagerly (default: the engine's, graphs where supported)")
    p.add_argument("--no-piecewise-graphs", action="store_true",
                   help="prefill and mixed steps fully eager (default: graph pieces where decode graphs run)")
    p.add_argument("--piecewise-max-rows", type=int, help="see EngineConfig.piecewise_max_rows (default: the engine's)")
    p.add_argument("--no-overlap-schedule", action="store_true",
                   help="process each step before the next (default: overlap on CUDA)")
    p.add_argument("--no-fused-kernels", action="store_true",
                   help="eager norms/RoPE/SiLU (default: torch.compile on CUDA)")
    p.add_argument("--no-cascade-attention", action="store_true",
                   help="attend to shared prefixes per sequence (default: cascade on CUDA)")
    p.add_argument("--no-triton-decode", action="store_true",
                   help="decode attention with FA4 (default: the Triton split-KV kernel where installed)")
    p.add_argument("--batch-order", default="prefix", choices=["prefix", "arrival"],
                   help="see EngineConfig.batch_order")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-tokens", type=int)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="see EngineConfig.kv_cache_dtype: auto (the model dtype) or fp8_e4m3")


def add_profile_args(p: argparse.ArgumentParser) -> None:
    """The options of `profile_decode`."""
    p.add_argument("--profile-steps", type=int, default=0, help="also profile this many decode steps")
    p.add_argument("--profile-only", action="store_true", help="skip the timed runs; profile only")
    p.add_argument("--trace", help="write the profiled steps' chrome trace here (.json.gz)")


def add_peer_args(p: argparse.ArgumentParser, peers: Sequence[str], default: str) -> None:
    """The options that pick and run the peer engine (vLLM's through `vllm_peer.run_peer`)."""
    p.add_argument("--peer", default=default, choices=[*peers, "none"],
                   help=f"the engine measured beside ours in the same run (default {default})")
    p.add_argument("--vllm-path", default=os.environ.get("RADIXSERVE_VLLM_PATH", "/tmp/vl"),
                   help="the PYTHONPATH of the vLLM peer's process (default $RADIXSERVE_VLLM_PATH or /tmp/vl)")
    p.add_argument("--vllm-log", help="keep the vLLM peer's log here (default: a temporary file)")
    p.add_argument("--vllm-timeout", type=float, default=1200, help="seconds before the vLLM peer is given up")
    p.add_argument("--check-seqs", type=int, default=4,
                   help="greedy outputs of this many prompts are compared between the engines (0: skip)")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens per greedy comparison")


def greedy_outputs(engine: Any, prompts: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """Greedy token ids of `prompts` from a fresh cache (the sanity check against a peer)."""
    engine.flush_cache()
    outs = engine.generate([list(p) for p in prompts],
                           SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), progress=False)
    return [list(o.token_ids) for o in outs]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine(...) keyword arguments from `add_engine_args` options."""
    return dict(
        device=args.device, dtype=args.dtype, max_running_requests=args.max_running,
        max_prefill_tokens=args.max_prefill_tokens, attention_backend=args.attention_backend,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        cuda_graphs=False if args.no_cuda_graphs else None,
        piecewise_graphs=False if args.no_piecewise_graphs else None, piecewise_max_rows=args.piecewise_max_rows,
        fused_kernels=False if args.no_fused_kernels else None, batch_order=args.batch_order,
        overlap_schedule=False if args.no_overlap_schedule else None,
        cascade_attention=False if args.no_cascade_attention else None,
        triton_decode=False if args.no_triton_decode else None,
    )


class Seq(NamedTuple):
    prompt: Sequence[int]
    output_len: int


def random_checkpoint(shape: str, directory: str | Path, device: str, seed: int = 0) -> Path:
    """A Qwen3 (Qwen3-MoE where the shape has num_experts) checkpoint of `shape` with random
    bf16 weights in `directory` (reused if present)."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    path = Path(directory)
    if (path / "config.json").exists():
        return path
    config_class = Qwen3MoeConfig if "num_experts" in SHAPES[shape] else Qwen3Config
    config = config_class(**SHAPES[shape], rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):  # initialize on the GPU: seconds instead of minutes for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    free_memory()
    return path


def nano_vllm_workload(
    num_seqs: int, seed: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab: int = 10000
) -> list[Seq]:
    """nano-vllm's bench.py: random token ids in [0, vocab), prompt and output lengths uniform."""
    rng = random.Random(seed)
    return [
        Seq([rng.randint(0, vocab - 1) for _ in range(rng.randint(*input_range))], rng.randint(*output_range))
        for _ in range(num_seqs)
    ]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, counting bytes read plus written (median of 10, after warm-up)."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    free_memory()
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


def measure_matmul_tflops(device: str, n: int = 8192) -> float:
    """bf16 n x n x n products on random data (median of 10, after warm-up)."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    free_memory()
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weight bytes, bytes of the weights a decode step's GEMMs read).

    A step reads every matrix once; the embedding table is read whole only when
    it doubles as the output projection (tied), else only its rows are gathered.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight
    tied = getattr(model, "lm_head", None) is None
    per_step = total if tied else total - embed.numel() * embed.element_size()
    return total, per_step


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """K and V of one token in every layer, stored as `dtype` (the KV pool's: fp8 is one byte)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * itemsize


def decode_floor(
    seqs: list[Seq], weight_bytes_per_step: int, kv_per_token: int, bandwidth_gbs: float, steps: int | None = None
) -> dict[str, float]:
    """Memory-bound floor of the decode phase: each step reads the weights once plus
    the K/V of every sequence it extends. Output token j >= 1 of a sequence with
    prompt p is computed over p + j tokens; token 0 comes from the prefill.
    `steps` None: the fewest possible (every sequence decodes in parallel)."""
    kv_tokens = sum((s.output_len - 1) * len(s.prompt) + (s.output_len - 1) * s.output_len // 2 for s in seqs)
    if steps is None:
        steps = max(s.output_len for s in seqs) - 1
    weight_read = steps * weight_bytes_per_step
    kv_read = kv_tokens * kv_per_token
    return {
        "steps": steps,
        "weight_read_gb": weight_read / 1e9,
        "kv_read_gb": kv_read / 1e9,
        "floor_s": (weight_read + kv_read) / (bandwidth_gbs * 1e9),
    }


def prefill_floor_s(seqs: list[Seq], matmul_params: int, model_config: Any, tflops: float) -> float:
    """Compute floor of the prefill: 2 flops per weight per token plus causal attention."""
    tokens = sum(len(s.prompt) for s in seqs)
    attn = sum(
        4 * model_config.num_layers * model_config.num_heads * model_config.head_dim * len(s.prompt) ** 2 / 2
        for s in seqs
    )
    return (2 * matmul_params * tokens + attn) / (tflops * 1e12)


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown (no git history here)"
    return env


class Timer:
    """Wall clock around GPU work: synchronizes on entry and exit."""

    def __enter__(self) -> Timer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def emit(record: dict[str, Any]) -> None:
    """The benchmark's result: one JSON line on stdout."""
    print(json.dumps(record, default=str), flush=True)


# -- decode-step profile -------------------------------------------------------------------------


def _categorize(kernel: str) -> str:
    k = kernel.lower()
    if "flash" in k or "fmha" in k or "attention" in k or "split_kv" in k or "merge_splits" in k:
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
    then under torch.profiler (kernel time by category, host syncs, GPU busy fraction).
    `--profile-steps` prefill steps (after two unprofiled ones) are profiled the same way,
    with the host's Python time by function (cProfile), under "prefill"."""
    import cProfile
    import pstats

    from torch.profiler import record_function

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
    n = args.profile_steps

    def prefilling() -> bool:
        return bool(sched.waiting) or any(r.kv_len < len(r.prompt_ids) for r in sched.running)

    for _ in range(2):
        core.step()
    prefill: dict[str, Any] = {}
    if prefilling():
        host = cProfile.Profile()

        def prefill_steps() -> int:
            done = 0
            while done < n and prefilling():
                host.enable()
                core.step()
                host.disable()
                done += 1
            return done

        prefill = _profiled(prefill_steps, args.device)
        stats = pstats.Stats(host)
        top_host = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:20]  # by cumulative time
        prefill["host_cumulative_ms"] = [
            f"{1e3 * cum / max(1, prefill['steps']):.2f} {func[2]} ({Path(func[0]).name}:{func[1]})"
            for func, (_, _, _, cum, _) in top_host
        ]
    while prefilling():
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
    state["sync_each_phase"] = True
    for _ in range(n):
        core.step()
    state["sync_each_phase"] = False
    with Timer() as free_run:
        for _ in range(n):
            core.step()

    def decode_steps() -> int:
        for _ in range(n):
            core.step()
        return n

    decode = _profiled(decode_steps, args.device, args.trace)
    return {
        "batch_size": len(sched.running),
        "context_tokens": sum(r.kv_len for r in sched.running),
        "step_ms": 1e3 * free_run.seconds / n,
        "synced_phase_ms": {k: sorted(v)[len(v) // 2] for k, v in phases.items()},
        **decode,
        "prefill": prefill,
    }


def _profiled(run_steps: Any, device: str, trace: str | None = None) -> dict[str, Any]:
    """Run `run_steps()` (returns how many steps it ran) under torch.profiler: per step, the
    wall time, kernel time by category, the GPU's busy fraction, host syncs and launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        with Timer() as profiled:
            n = max(1, run_steps())
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
    if trace:
        raw = Path(trace).with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    gpu_ms = sum(kernels.values())
    return {
        "steps": n,
        "step_ms_profiled": 1e3 * profiled.seconds / n,
        "gpu_kernel_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
        "gpu_busy_fraction": gpu_ms / (1e3 * profiled.seconds / n),
        "host_syncs_per_step": syncs / n,
        "kernel_launches_per_step": launches / n,
        "top_kernels_ms": [f"{ms:.3f} {name}" for ms, name in sorted(top, reverse=True)[:12]],
    }
