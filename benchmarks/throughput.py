"""Offline throughput on nano-vllm's workload, with vLLM or transformers as the peer in the same run.

Workload (nano-vllm bench.py): 256 sequences, prompts of random token ids with
lengths uniform in [100, 1024], output lengths uniform in [100, 1024],
temperature 0.6, ignore_eos. The model is a Qwen3 shape with random weights
(speed depends on shapes only) unless --model names a checkpoint.

Prints one JSON line: output tokens/s; the peer's, and our engine's over it as
a ratio; and the memory-bandwidth floor of the decode phase (weights plus every active
sequence's K/V read once per step, summed over the run, over a device-to-device
copy's measured bandwidth) with the fraction of it achieved.

Peers (`--peer`):
- `vllm`: vLLM's offline `LLM` on the whole workload (the same checkpoint, the
  same token-id prompts, temperature and output lengths; prefix caching on, its
  defaults otherwise), in a process of its own started with `--vllm-path` as its
  PYTHONPATH (`vllm_peer.py`), before our engine loads. Both engines must
  produce every requested token (ignore_eos); greedy outputs of `--check-seqs`
  prompts are compared for agreement (bf16: late divergence is expected).
- `transformers` (default): `generate` (static batching) on the first
  `--hf-seqs` prompts with `--hf-new-tokens` each, in this process; our engine
  runs that same subset for the ratio.

--kv-cache-dtype takes a comma-separated list (`auto,fp8_e4m3`): our engine then
runs the workload once per KV dtype, in turn, each with its own floor (the K/V
bytes of the dtype in use), and the record adds each run's output tokens/s over
the first's (`ratio_vs_first_kv_cache_dtype`). `radixserve` holds the first run.

--profile-steps N adds a decode-step breakdown (torch.profiler, see profile_decode).

    python benchmarks/throughput.py                       # Qwen3-0.6B shape on cuda
    python benchmarks/throughput.py --peer vllm --vllm-path /tmp/vl
    python benchmarks/throughput.py --shape qwen3-8b --hf-seqs 16
    python benchmarks/throughput.py --no-cuda-graphs       # eager decode (graphs are the engine's default)
    python benchmarks/throughput.py --peer none --kv-cache-dtype auto,fp8_e4m3   # bf16 vs fp8 KV cache
    python benchmarks/throughput.py --shape tiny --device cpu --dtype float32 --num-seqs 4 \\
        --input-len 10 20 --output-len 5 10 --hf-seqs 2 --hf-new-tokens 4   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from _workloads import (
    Seq,
    Timer,
    add_engine_args,
    add_peer_args,
    add_profile_args,
    decode_floor,
    emit,
    engine_kwargs,
    environment,
    free_memory,
    greedy_outputs,
    kv_bytes_per_token,
    measure_bandwidth_gbs,
    measure_matmul_tflops,
    model_bytes,
    nano_vllm_workload,
    prefill_floor_s,
    profile_decode,
    random_checkpoint,
)
from vllm_peer import run_peer, token_agreement

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
    add_peer_args(p, ["transformers", "vllm"], default="transformers")
    add_profile_args(p)
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


def run_vllm(
    ckpt: Path, seqs: list[Seq], check: list[Seq], args: argparse.Namespace, kv_cache_dtype: str = "auto"
) -> dict[str, Any]:
    """vLLM on the whole workload (vllm_peer.py), at the same temperature and output lengths,
    with its KV cache in `kv_cache_dtype` (vLLM's option of the same name)."""
    return run_peer(
        ckpt, [s.prompt for s in seqs], [s.output_len for s in seqs], temperature=0.6, dtype=args.dtype,
        vllm_path=args.vllm_path, check_prompts=[s.prompt for s in check], check_tokens=args.check_tokens,
        kv_cache_dtype=kv_cache_dtype,
        log_path=Path(args.vllm_log) if args.vllm_log else None, timeout_s=args.vllm_timeout,
    )


def run_ours(
    ckpt: Path, seqs: list[Seq], hf_subset: list[Seq], args: argparse.Namespace, check: list[Seq] | None = None,
) -> dict[str, Any]:
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
        if check:
            result["check_greedy_tokens"] = greedy_outputs(engine, [s.prompt for s in check], args.check_tokens)
        result["weight_bytes"], result["weight_bytes_per_step"] = model_bytes(core.runner.model)
        result["kv_cache_dtype"] = str(core.runner.pool.dtype).removeprefix("torch.")
        result["kv_bytes_per_token"] = kv_bytes_per_token(core.runner.model_config, core.runner.pool.dtype)
        result["_config"] = core.runner.model_config
    finally:
        engine.shutdown()
        del engine, core
        free_memory()
    return result


def floor(
    seqs: list[Seq], ours: dict[str, Any], config: Any, args: argparse.Namespace, bandwidth: float, tflops: float,
    peer: dict[str, Any],
) -> dict[str, Any]:
    """The run's floor: decode reads the weights and the K/V (in the pool's dtype) once per step,
    prefill at the matmul peak; and the fraction of it our run (and vLLM's) achieved."""
    kv_tok = ours["kv_bytes_per_token"]
    w_step = ours["weight_bytes_per_step"]
    ideal = decode_floor(seqs, w_step, kv_tok, bandwidth)
    actual_steps = decode_floor(seqs, w_step, kv_tok, bandwidth, steps=ours["steps"])
    matmul_params = w_step // torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    prefill = prefill_floor_s(seqs, matmul_params, config, tflops)
    floor_s = ideal["floor_s"] + prefill
    result = {
        "decode_memory_floor": ideal, "decode_floor_at_our_step_count": actual_steps,
        "prefill_compute_floor_s": prefill, "floor_s": floor_s,
        "achieved_fraction": floor_s / ours["time_s"],
    }
    if "time_s" in peer:
        result["vllm_achieved_fraction"] = floor_s / peer["time_s"]
    return result


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
    subset = seqs[: args.hf_seqs] if args.peer == "transformers" else []
    check = seqs[: args.check_seqs] if args.peer == "vllm" else []
    record["workload"] = {
        "num_seqs": len(seqs), "prompt_tokens": sum(len(s.prompt) for s in seqs),
        "output_tokens": sum(s.output_len for s in seqs), "input_len": args.input_len,
        "output_len": args.output_len, "temperature": 0.6, "ignore_eos": True,
    }
    if subset:
        record["transformers"] = run_hf(ckpt, subset, args.hf_new_tokens, args)
    kv_dtypes = args.kv_cache_dtype.split(",")
    # vLLM first, while this process holds no GPU memory beyond its context: one run per KV
    # dtype, so that each of ours meets vLLM's with the same cache format.
    peers = {kv: run_vllm(ckpt, seqs, check, args, kv) for kv in kv_dtypes} if args.peer == "vllm" else {}
    if peers:
        record["vllm"] = peers[kv_dtypes[0]]
        if len(kv_dtypes) > 1:
            record["vllm_by_kv_cache_dtype"] = {kv: peers[kv] for kv in kv_dtypes[1:]}
    runs = []
    for kv_dtype in kv_dtypes:  # one engine at a time: each run frees its engine before the next
        run_args = copy.copy(args)
        run_args.kv_cache_dtype = kv_dtype
        runs.append(run_ours(ckpt, seqs, subset, run_args, check))
    for kv_dtype, ours in zip(kv_dtypes, runs):
        peer = peers.get(kv_dtype, {})
        peer_greedy = peer.pop("check_greedy_tokens", None)
        config = ours.pop("_config")
        requested = record["workload"]["output_tokens"]
        ours["output_tokens_as_requested"] = ours["output_tokens"] == requested
        greedy = ours.pop("check_greedy_tokens", None)
        if "time_s" in peer:
            ours["ratio_vs_vllm"] = ours["output_tok_s"] / peer["output_tok_s"]
            if greedy is not None and peer_greedy is not None:
                ours["greedy_agreement_vs_vllm"] = token_agreement(greedy, peer_greedy)
        if subset:
            ours["ratio_vs_transformers_same_subset"] = ours["same_subset_tok_s"] / record["transformers"]["tok_s"]
            ours["ratio_full_run_vs_transformers_subset"] = ours["output_tok_s"] / record["transformers"]["tok_s"]
        ours["floor"] = floor(seqs, ours, config, args, bandwidth, tflops, peer)
        ours["kv_cache_dtype_option"] = kv_dtype
    first = runs[0]
    record["radixserve"] = first
    # The first run's comparisons at the top level too, where they always were.
    record["output_tokens_as_requested"] = {"radixserve": first.pop("output_tokens_as_requested")}
    peer = peers.get(kv_dtypes[0], {})
    if "time_s" in peer:
        record["output_tokens_as_requested"]["vllm"] = peer["output_tokens"] == record["workload"]["output_tokens"]
    for key in ("ratio_vs_vllm", "greedy_agreement_vs_vllm", "ratio_vs_transformers_same_subset",
                "ratio_full_run_vs_transformers_subset", "floor"):
        if key in first:
            record[key] = first.pop(key)
    if len(runs) > 1:
        record["radixserve_by_kv_cache_dtype"] = dict(zip(kv_dtypes[1:], runs[1:]))
        record["ratio_vs_first_kv_cache_dtype"] = {
            kv_dtype: run["output_tok_s"] / first["output_tok_s"] for kv_dtype, run in zip(kv_dtypes[1:], runs[1:])
        }
    emit(record)
    if args.profile_steps:
        emit({"bench": "decode_profile", "shape": record["shape"], **profile_decode(ckpt, seqs, args)})


if __name__ == "__main__":
    main()
