"""SGLang's generated-shared-prefix workload: the prefix cache on against off, and against vLLM, in one run.

Workload (SGLang bench_serving `generated-shared-prefix`): 64 groups x 16
prompts; each group shares a 2048-token system prompt, each prompt adds its
own 128-token question; 256 output tokens each; all requests submitted at once,
in shuffled order. Tokens are random ids; the model is a Qwen3 shape with
random weights unless --model is given (as in throughput.py).

Prints one JSON line: prompt and output tokens/s and the cache hit rate, for
our engine with the prefix cache and within-batch folding on (the defaults)
and with both off (the baseline: no request shares K/V or work with
another), and their speed ratio; with --peer vllm, vLLM's offline `LLM` on the
same checkpoint, prompts and sampling settings (prefix caching on, its defaults
otherwise; vllm_peer.py, in a process of its own with --vllm-path as its
PYTHONPATH, run before our engine loads), with our cache-on run's speed over it.
--cache-on-only skips the cache-off run. Add --fold-baseline for a cache-off run with
folding on (requests prefilled in one batch share their prefix), and
--cascade-baseline for a cache-on run without cascade attention (what cascade
adds). Both runs take the same --max-running; the cache-off one holds fewer
requests at once where the KV pool runs out (each holds its whole prompt).

The floor (printed under "floor") is the time no engine can beat on this
workload with cascade attention, every request decoding at once (the fewest
steps: output_len - 1) and the uncached prompt tokens computed once:

    decode  = sum over steps j = 1 .. O-1 of max(bytes_j / bandwidth, flops_j / peak)
      bytes_j = W + kv * (G * P + N * (Q + j))
      flops_j = N * (2 * M + 2 * V * H + 4 * L * Hq * D * (P + Q + j))
    prefill = (2 * M * (G * P + N * Q) + 2 * V * H * N
               + 4 * L * Hq * D * (G * P^2 / 2 + N * (Q * P + Q^2 / 2))) / peak

with G groups of P shared tokens, N requests of Q own tokens and O output tokens;
W the weight bytes a decode step reads (every matrix once, the output head
included), kv the K/V bytes per token (all layers), M the parameters of the
decoder layers, V x H the output head, L layers, Hq query heads of D. Each
step reads each group's prefix K/V once (cascade attention's shared pass) and
each request's own K/V (question and generated tokens) once; prefill computes
each group's prefix once and each question once. Bandwidth is a measured
device-to-device copy (bytes read plus written), peak a measured bf16 matmul.
Output token 0 comes from the prefill. Sampling and host time count as zero.

    python benchmarks/shared_prefix.py
    python benchmarks/shared_prefix.py --groups 16 --prompts-per-group 16 --output-len 128   # shorter
    python benchmarks/shared_prefix.py --cache-on-only --peer vllm --vllm-path /tmp/vl
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
from _workloads import (
    Seq,
    Timer,
    add_engine_args,
    add_peer_args,
    add_profile_args,
    emit,
    engine_kwargs,
    environment,
    free_memory,
    greedy_outputs,
    kv_bytes_per_token,
    measure_bandwidth_gbs,
    measure_matmul_tflops,
    model_bytes,
    profile_decode,
    random_checkpoint,
)
from vllm_peer import run_peer, token_agreement

from radixserve import Engine, SamplingParams
from radixserve.replay.gentrace import GenConfig, generate_trace


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    # Every request of the workload may run at once (the cache-off run holds fewer: its KV pool
    # runs out first); SGLang sizes its running batch from memory the same way.
    p.set_defaults(max_running=1024)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--no-shuffle", action="store_true", help="submit group by group")
    p.add_argument("--fold-mode", help="within-batch folding for every run (default: the engine's)")
    p.add_argument("--fold-baseline", action="store_true",
                   help="add a run: cache off, folding on (prefixes shared within a batch only)")
    add_profile_args(p)  # profiles decode steps of one wave: the first --max-running requests
    p.add_argument("--schedule-policy", default="fcfs", choices=["fcfs", "lpm"], help="see EngineConfig")
    p.add_argument("--cascade-baseline", action="store_true",
                   help="add a run: cache on, cascade attention off")
    p.add_argument("--cache-on-only", action="store_true",
                   help="only the cache-on run (to profile it from outside, e.g. with py-spy), and the peer's")
    p.add_argument("--bandwidth-gbs", type=float, help="the floor's bandwidth: skip measuring, use this")
    add_peer_args(p, ["vllm"], default="none")
    return p.parse_args()


WORKLOAD_VOCAB = 10000  # token ids of the workload: [0, WORKLOAD_VOCAB)


def shared_prefix_workload(args: argparse.Namespace, vocab: int = WORKLOAD_VOCAB) -> list[Seq]:
    """SGLang's generated-shared-prefix workload, from the generator `radixserve gen-trace` uses."""
    cfg = GenConfig(
        groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_prompt_len,
        question_len=args.question_len, output_len=args.output_len, seed=args.seed, token_range=(0, vocab),
    )
    # The generator interleaves groups at random; --no-shuffle submits group by group.
    records = list(generate_trace(cfg))
    if args.no_shuffle:
        records.sort(key=lambda r: r["input_ids"][: args.system_prompt_len])
    # Held as tuples: a list of 2,176 ids is 2,176 items for every full collection to visit
    # while the run goes on (the harness's data, not the engine's; the engine copies them).
    return [Seq(tuple(r["input_ids"]), r["output_len"]) for r in records]


class StepTimeline:
    """Where the run's time goes: wraps the engine's step (the loop thread looks it up each
    time), the scheduler's batch builders and the step's phases, and sums wall time per kind
    of step. Phases (host wall time, no syncs added): `schedule` (either builder and
    can_schedule_ahead), `launch` (queueing the forward and sampling), `wait` (for the GPU:
    a step's sampled tokens on the host) and `process`."""

    PHASES = ("schedule", "launch", "wait", "process")

    def __init__(self, engine: Engine) -> None:
        self.core = engine.core
        # (seconds, graph, sequences, groups, {phase: seconds})
        self.rows: list[tuple[float, bool, int, int, dict[str, float]]] = []
        self._batch = (0, 0)
        self._phases: dict[str, float] = dict.fromkeys(self.PHASES, 0.0)
        core, sched = self.core, self.core.scheduler
        self._originals = (core.step, core._launch, core._complete, sched.schedule, sched.schedule_ahead,
                           sched.can_schedule_ahead, sched.process)
        step, launch, complete, schedule, ahead, can_ahead, process = self._originals
        last = [time.perf_counter()]

        def note(batch: Any) -> Any:
            if batch is not None:
                plan = batch.forward.cascade
                self._batch = (batch.forward.batch_size, 0 if plan is None else len(plan.group_sizes))
            return batch

        def timed(phase: str, fn: Any) -> Any:
            def wrapped(*a: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    self._phases[phase] += time.perf_counter() - start
            return wrapped

        def timed_step() -> Any:
            graphs = core.runner.graph_batches
            self._batch = (0, 0)
            self._phases = dict.fromkeys(self.PHASES, 0.0)
            out = step()
            now = time.perf_counter()
            phases = self._phases
            phases["wait"] -= phases["process"]  # _complete is the wait, then process
            self.rows.append((now - last[0], core.runner.graph_batches > graphs, *self._batch, phases))
            last[0] = now
            return out

        core.step = timed_step
        core._launch = timed("launch", launch)
        core._complete = timed("wait", complete)
        sched.process = timed("process", process)
        sched.can_schedule_ahead = timed("schedule", can_ahead)
        sched.schedule = timed("schedule", lambda: note(schedule()))
        sched.schedule_ahead = timed("schedule", lambda prev: note(ahead(prev)))
        # Collector pauses by generation (a full pass over a big heap stalls a step).
        self.gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        started = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.gc_pauses[info["generation"]].append(time.perf_counter() - started[0])

        self._on_gc = on_gc
        gc.callbacks.append(on_gc)
        self.compiled_before = _compiled_kernels()
        self.allocator_before = _allocator_counts(core.device)

    def detach(self) -> None:
        gc.callbacks.remove(self._on_gc)
        core, sched = self.core, self.core.scheduler
        (core.step, core._launch, core._complete, sched.schedule, sched.schedule_ahead,
         sched.can_schedule_ahead, sched.process) = self._originals
        self.compiled = {k: v - self.compiled_before.get(k, 0) for k, v in _compiled_kernels().items()}
        self.allocator = {k: v - self.allocator_before[k] for k, v in _allocator_counts(core.device).items()}
        # What a full collection walks: objects tracked and not frozen (the engine still runs), by type.
        tracked = collections.Counter(type(o).__name__ for o in gc.get_objects())
        self.tracked = {"total": sum(tracked.values()), "top": tracked.most_common(8)}

    def summary(self) -> dict[str, Any]:
        slowest = sorted(range(len(self.rows)), key=lambda i: self.rows[i][0], reverse=True)[:8]
        out: dict[str, Any] = {
            "slowest_ms": [round(1e3 * self.rows[i][0], 1) for i in slowest],
            # (step index, graph replay, sequences, cascade groups) of each of those steps
            "slowest_steps": [(i, *self.rows[i][1:4], {k: round(1e3 * v, 1) for k, v in self.rows[i][4].items()})
                              for i in slowest],
        }
        for kind, graph in (("graph", True), ("eager", False)):
            rows = [r for r in self.rows if r[1] == graph and r[2] > 0]
            if rows:
                times = sorted(r[0] for r in rows)
                out[kind] = {
                    "steps": len(rows), "time_s": sum(times), "median_ms": 1e3 * times[len(times) // 2],
                    "mean_sequences": sum(r[2] for r in rows) / len(rows),
                    "mean_groups": sum(r[3] for r in rows) / len(rows),
                    # per phase: the median step's ms, and the sum over these steps in s
                    "phase_median_ms": {
                        ph: round(1e3 * sorted(r[4][ph] for r in rows)[len(rows) // 2], 2) for ph in self.PHASES
                    },
                    "phase_total_s": {ph: round(sum(r[4][ph] for r in rows), 3) for ph in self.PHASES},
                }
        out["compiled_during_run"] = self.compiled
        out["allocator_during_run"] = self.allocator
        out["gc_tracked_after_run"] = self.tracked
        out["gc_pauses"] = {  # per generation: count, total and longest ms
            f"gen{g}": (len(p), round(1e3 * sum(p), 1), round(1e3 * max(p, default=0.0), 1))
            for g, p in self.gc_pauses.items()
        }
        return out


def _allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's counters: a retry (a cudaMalloc that failed, then freed
    every cached block and tried again) and a sync of all streams each hold the host until
    the GPU drains, which an overlapped step cannot afford."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    names = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free", "num_ooms")
    return {name: int(stats.get(name, 0)) for name in names}


def _compiled_kernels() -> dict[str, int]:
    """Kernels compiled so far: FA4 variants, torch.compile graphs (a compile mid-run stalls it)."""
    counts = {}
    try:
        from flash_attn.cute import interface
    except Exception:  # no FA4 here, or its CuTe DSL libraries fail to load (as load_fa4)
        pass
    else:  # its JIT cache keeps the compiled variants in a dict
        counts["fa4"] = len(interface._flash_attn_fwd.compile_cache.cache)
    import torch._dynamo.utils

    counts["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))
    return counts


def run(
    ckpt: Path, seqs: list[Seq], args: argparse.Namespace, prefix_cache: bool, fold: str | None,
    cascade: bool | None = None, check: list[Seq] | None = None,
) -> dict[str, Any]:
    options = dict(engine_kwargs(args), enable_prefix_cache=prefix_cache, schedule_policy=args.schedule_policy)
    if fold is not None:
        options["fold_mode"] = fold
    if cascade is not None:
        options["cascade_attention"] = cascade
    engine = Engine(str(ckpt), **options)
    try:
        # Warm-up on unrelated prompts of the workload's shape (2 groups x 4, another seed),
        # then an empty cache: first-use costs of full-size prefill chunks, folding and
        # cascade steps (kernel variants specialized on sizes, GEMM heuristics) fall here, not
        # in whichever timed run comes first in the process (they had cost the first run's
        # first step ~0.4 s).
        warm_cfg = GenConfig(
            groups=2, prompts_per_group=4, system_len=args.system_prompt_len, question_len=args.question_len,
            output_len=4, seed=args.seed + 1, token_range=(0, WORKLOAD_VOCAB),
        )
        warm = [r["input_ids"] for r in generate_trace(warm_cfg)]
        engine.generate(warm, SamplingParams(max_tokens=4, temperature=0.6, ignore_eos=True), progress=False)
        engine.flush_cache()
        before = engine.stats()
        timeline = StepTimeline(engine)
        params = [SamplingParams(max_tokens=s.output_len, temperature=0.6, ignore_eos=True, seed=i)
                  for i, s in enumerate(seqs)]
        with Timer() as t:
            outs = engine.generate([s.prompt for s in seqs], params, progress=False)
        after = engine.stats()
        timeline.detach()
        fold_mode = engine.config.fold_mode
        cascade_min_prefix = engine.core.scheduler.config.cascade_min_prefix
        greedy = greedy_outputs(engine, [s.prompt for s in check], args.check_tokens) if check else None
        shape = model_shape(engine)
    finally:
        engine.shutdown()
        del engine
        free_memory()
    prompt_tokens = sum(len(s.prompt) for s in seqs)
    output_tokens = sum(len(o.token_ids) for o in outs)
    queried = after["queried_tokens"] - before["queried_tokens"]
    return {
        "prefix_cache": prefix_cache,
        "fold_mode": fold_mode,
        "cascade_min_prefix": cascade_min_prefix,  # 0: cascade attention off
        "time_s": t.seconds,
        "prompt_tok_s": prompt_tokens / t.seconds,
        "output_tok_s": output_tokens / t.seconds,
        "output_tokens": output_tokens,
        "cache_hit_rate": (after["hit_tokens"] - before["hit_tokens"]) / queried if queried else 0.0,
        "computed_tokens": after["computed_tokens"] - before["computed_tokens"],
        "steps": after["steps"] - before["steps"],
        "graph_steps": after["graph_steps"] - before["graph_steps"],
        "retractions": after["retractions"] - before["retractions"],
        "cascade_batches": after["cascade_batches"] - before["cascade_batches"],
        "step_time": timeline.summary(),
        "_greedy": greedy,
        "_shape": shape,
    }


def baseline(*a: Any, **kw: Any) -> dict[str, Any]:
    """`run` without the parts only the cache-on run reports."""
    result = run(*a, **kw)
    del result["_greedy"], result["_shape"]
    return result


def model_shape(engine: Engine) -> dict[str, int]:
    """The model's numbers that `cascade_floor` needs."""
    runner = engine.core.runner
    model, cfg = runner.model, runner.model_config
    weights, per_step = model_bytes(model)
    itemsize = next(model.parameters()).element_size()
    head = cfg.vocab_size * cfg.hidden_size  # the output head, tied to the embedding or not
    embeddings = head * (1 if cfg.tie_word_embeddings else 2)
    return {
        "weight_bytes_per_step": per_step, "kv_bytes_per_token": kv_bytes_per_token(cfg, runner.pool.dtype),
        "layer_params": weights // itemsize - embeddings, "head_params": head,
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
    }


def cascade_floor(
    args: argparse.Namespace, shape: dict[str, int], bandwidth_gbs: float, tflops: float
) -> dict[str, Any]:
    """The workload's bandwidth-and-compute floor with cascade attention (the module docstring
    gives the formula): seconds for decode and prefill, and the bytes and flops behind them."""
    g, p, q, o = args.groups, args.system_prompt_len, args.question_len, args.output_len
    n = g * args.prompts_per_group
    bandwidth, peak = bandwidth_gbs * 1e9, tflops * 1e12
    attn = 4 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"]  # flops per (query, key) pair
    per_token = 2 * shape["layer_params"] + 2 * shape["head_params"]
    decode_s = kv_read = weight_read = decode_flops = 0.0
    for j in range(1, o):
        step_bytes = shape["weight_bytes_per_step"] + shape["kv_bytes_per_token"] * (g * p + n * (q + j))
        step_flops = n * (per_token + attn * (p + q + j))
        decode_s += max(step_bytes / bandwidth, step_flops / peak)
        weight_read += shape["weight_bytes_per_step"]
        kv_read += step_bytes - shape["weight_bytes_per_step"]
        decode_flops += step_flops
    prefill_flops = (2 * shape["layer_params"] * (g * p + n * q) + 2 * shape["head_params"] * n
                     + attn * (g * p * p / 2 + n * (q * p + q * q / 2)))
    prefill_s = prefill_flops / peak
    return {
        "bandwidth_gbs": bandwidth_gbs, "matmul_tflops": tflops, "decode_steps": o - 1,
        "weight_read_gb": weight_read / 1e9, "kv_read_gb": kv_read / 1e9, "decode_tflop": decode_flops / 1e12,
        "decode_floor_s": decode_s, "prefill_tflop": prefill_flops / 1e12, "prefill_floor_s": prefill_s,
        "floor_s": decode_s + prefill_s,
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("radixserve.model_runner.attention").setLevel(logging.INFO)
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs(args.device)
    tflops = measure_matmul_tflops(args.device)
    ckpt = Path(args.model) if args.model else random_checkpoint(
        args.shape, args.ckpt_dir or f"/tmp/radixserve-{args.shape}", args.device, seed=args.seed
    )
    seqs = shared_prefix_workload(args)
    if args.profile_steps:
        wave = seqs[: args.max_running]
        emit({"bench": "shared_prefix_decode_profile", "shape": args.model or args.shape,
              "cascade_attention": not args.no_cascade_attention, **profile_decode(ckpt, wave, args)})
        if args.profile_only:
            return
    record: dict[str, Any] = {
        "bench": "shared_prefix", "shape": args.model or args.shape, **environment(args.device),
        "workload": {
            "groups": args.groups, "prompts_per_group": args.prompts_per_group,
            "system_prompt_len": args.system_prompt_len, "question_len": args.question_len,
            "output_len": args.output_len, "shuffled": not args.no_shuffle,
            "prompt_tokens": sum(len(s.prompt) for s in seqs), "output_tokens": sum(s.output_len for s in seqs),
        },
    }
    check = seqs[: args.check_seqs] if args.peer == "vllm" else []
    if args.peer == "vllm":  # first, while this process holds no GPU memory beyond its context
        record["vllm"] = run_peer(
            ckpt, [s.prompt for s in seqs], [s.output_len for s in seqs], temperature=0.6, dtype=args.dtype,
            vllm_path=args.vllm_path, check_prompts=[s.prompt for s in check], check_tokens=args.check_tokens,
            log_path=Path(args.vllm_log) if args.vllm_log else None, timeout_s=args.vllm_timeout,
        )
    on = run(ckpt, seqs, args, prefix_cache=True, fold=args.fold_mode, check=check)
    greedy, shape = on.pop("_greedy"), on.pop("_shape")
    record["cache_on"] = on
    requested = record["workload"]["output_tokens"]
    record["output_tokens_as_requested"] = {"radixserve": on["output_tokens"] == requested}
    floor = cascade_floor(args, shape, bandwidth, tflops)
    floor["radixserve_time_over_floor"] = on["time_s"] / floor["floor_s"]
    peer = record.get("vllm", {})
    if "time_s" in peer:
        record["output_tokens_as_requested"]["vllm"] = peer["output_tokens"] == requested
        record["speedup_vs_vllm"] = peer["time_s"] / on["time_s"]
        floor["vllm_time_over_floor"] = peer["time_s"] / floor["floor_s"]
        if greedy is not None:
            record["greedy_agreement_vs_vllm"] = token_agreement(greedy, peer.pop("check_greedy_tokens"))
    record["floor"] = floor
    if not args.cache_on_only:
        off = baseline(ckpt, seqs, args, prefix_cache=False, fold="off")
        record |= {"cache_off": off,  # cache_off: folding off too
                   "speedup_cache_on_vs_off": off["time_s"] / on["time_s"],
                   "prompt_throughput_ratio": on["prompt_tok_s"] / off["prompt_tok_s"]}
        if args.fold_baseline:
            folded = baseline(ckpt, seqs, args, prefix_cache=False, fold=args.fold_mode)
            record |= {"cache_off_fold_on": folded, "speedup_cache_on_vs_fold_only": folded["time_s"] / on["time_s"]}
        if args.cascade_baseline:
            flat = baseline(ckpt, seqs, args, prefix_cache=True, fold=args.fold_mode, cascade=False)
            record |= {"cache_on_cascade_off": flat, "speedup_cascade_on_vs_off": flat["time_s"] / on["time_s"]}
    emit(record)


if __name__ == "__main__":
    main()
