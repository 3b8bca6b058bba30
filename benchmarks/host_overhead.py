"""Host (Python) time per decode step, part by part, on the CPU.

On a GPU, a decode step of the throughput run (256 sequences, temperature 0.6,
CUDA graphs, overlapped scheduling) leaves the GPU idle for as long as the host
takes longer than the GPU, so the host's share of a step is what this measures.
The workload is throughput.py's (nano-vllm's: random prompts of 100-1024 tokens,
temperature 0.6, ignore_eos) on a tiny random Qwen3 on the CPU, through the
public `Engine.generate` (overlap on, fused kernels off). Every prompt is
prefilled in one step; then each steady step (sequences decoding, one step in
flight, nothing waiting) is timed by wrapping the engine's parts: the
scheduler's, the sampler's, the engine loop's delivery. The forward and the
sampler's tensor work are timed too but left out of the host total: on the CPU
they compute, on a GPU they only launch (the forward is one graph replay).
By default every sequence decodes through the timed steps; with --output-len
they end at random lengths as in throughput.py, so the batch shrinks.

The CPU forward also evicts the host's caches between the parts, which a GPU's
does not: --stub-device replaces the decode steps' forward and sampler tensor
work with stand-ins of the right shape (fixed random logits, random tokens; with
ignore_eos the steps take the same path), for host times closer to a GPU host's.

Prints a table of milliseconds per step (median and mean over the timed steps),
then with --profile N the cProfile top functions of N more steps (the device
work left out), and with --json one JSON line instead.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --stub-device --steps 200 --profile 50
    python benchmarks/host_overhead.py --stub-device --steps 300 --output-len 20 400
    python benchmarks/host_overhead.py --num-seqs 8 --input-len 10 20 --steps 5 --json   # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _workloads import SHAPES, emit, environment, nano_vllm_workload, random_checkpoint

from radixserve import Engine, SamplingParams
from radixserve.model_runner.model_runner import ForwardOutput, ModelRunner
from radixserve.model_runner.sampler import SampleOutput

# (label, what it is) in the table's order. The host parts:
PARTS = (
    ("can_ahead", "Scheduler.can_schedule_ahead"),
    ("schedule_ahead", "Scheduler.schedule_ahead: build step t+1"),
    ("sampling", "EngineCore._sampling_batch: rows and build, or next_step"),
    ("to_host", "ModelRunner.to_host"),
    ("process", "Scheduler.process: append tokens, stop checks"),
    ("dispatch", "Engine._dispatch: trackers"),
    ("stats", "EngineCore.stats (engine loop)"),
    ("other", "the rest of the engine loop and step"),
)
# The device work: on the CPU it computes, on a GPU it only launches.
DEVICE_PARTS = (("forward", "ModelRunner.forward"), ("sample", "ModelRunner.sample: the sampler's tensor ops"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny-host", choices=sorted(SHAPES))
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="random output lengths (default: every sequence outlasts the measured steps)")
    p.add_argument("--warmup", type=int, default=5, help="steady steps run before timing")
    p.add_argument("--steps", type=int, default=40, help="steady steps timed")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steady steps (cProfile)")
    p.add_argument("--profile-top", type=int, default=25, help="functions listed from the profile")
    p.add_argument("--stub-device", action="store_true", help="stand-ins for the decode steps' device work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the tables")
    return p.parse_args()


def stub_device_work(runner: ModelRunner, num_seqs: int) -> None:
    """Decode steps get fixed random logits and random tokens instead of the forward and the
    sampler's tensor work; every other step runs as it is."""
    forward, sample = runner.forward, runner.sample
    vocab = runner.vocab_size
    logits = torch.randn(num_seqs, vocab)
    stand_ins = {n: logits[:n] for n in range(1, num_seqs + 1)}  # by batch size, so `sample` knows its own

    def stand_in_forward(batch: Any) -> ForwardOutput:
        if batch.is_decode:
            return ForwardOutput(stand_ins[batch.batch_size], None, None)
        return forward(batch)

    def stand_in_sample(step_logits: torch.Tensor, sampling: Any) -> SampleOutput:
        n = step_logits.shape[0]
        if step_logits is stand_ins.get(n):
            return SampleOutput(torch.randint(vocab, (n,)), None, None, None)
        return sample(step_logits, sampling)

    runner.forward, runner.sample = stand_in_forward, stand_in_sample


class StepTimer:
    """Times the engine loop's parts per iteration of `Engine._iterate`, for steady steps only.

    A step is steady when it starts with a decode step in flight, nothing waiting, and
    leaves the next one in flight: the overlapped path the GPU run spends its decode
    phase in."""

    def __init__(self, engine: Engine, warmup: int, steps: int, profile_steps: int) -> None:
        self.engine = engine
        self.plan = [("warmup", warmup), ("timed", steps), ("profiled", profile_steps)]
        self.current: dict[str, float] | None = None
        self.timed: list[dict[str, float]] = []
        self.profiler = cProfile.Profile()
        self.profiling = False
        self.steady_seen = 0
        core, runner = engine.core, engine.core.runner
        # Wrapped on the instances, so the engine runs as it is.
        for obj, name, label in [
            (core.scheduler, "can_schedule_ahead", "can_ahead"),
            (core.scheduler, "schedule_ahead", "schedule_ahead"),
            (core, "_sampling_batch", "sampling"),
            (core.scheduler, "process", "process"),
            (runner, "forward", "forward"),
            (runner, "sample", "sample"),
            (runner, "to_host", "to_host"),
            (engine, "_dispatch", "dispatch"),
            (core, "stats", "stats"),
        ]:
            setattr(obj, name, self._timed(getattr(obj, name), label))
        engine._iterate = self._iteration(engine._iterate)

    def _phase(self) -> str | None:
        n = self.steady_seen
        for name, count in self.plan:
            if n < count:
                return name
            n -= count
        return None

    def _steady(self) -> bool:
        core = self.engine.core
        return core._inflight is not None and not core.scheduler.waiting

    def _timed(self, fn: Callable, label: str) -> Callable:
        def wrapped(*a: Any, **kw: Any) -> Any:
            pause = self.profiling and label in dict(DEVICE_PARTS)  # the profile is of the host's work
            if pause:
                self.profiler.disable()
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if pause:
                    self.profiler.enable()
                if self.current is not None:
                    self.current[label] = self.current.get(label, 0.0) + 1e3 * (time.perf_counter() - start)

        return wrapped

    def _iteration(self, iterate: Callable[[], bool]) -> Callable[[], bool]:
        def wrapped() -> bool:
            phase = self._phase() if self._steady() else None
            if phase is None:
                return iterate()
            self.current = {}
            self.profiling = phase == "profiled"
            if self.profiling:
                self.profiler.enable()
            start = time.perf_counter()
            more = iterate()
            total = 1e3 * (time.perf_counter() - start)
            if self.profiling:
                self.profiler.disable()
                self.profiling = False
            record, self.current = self.current, None
            if self.engine.core._inflight is None:  # the step did not stay on the overlapped path
                return more
            self.steady_seen += 1
            if phase == "timed":
                record["total"] = total
                self.timed.append(record)
            return more

        return wrapped


def summarize(records: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and mean ms per step of each part; `host` is the step without the device work."""
    per_part: dict[str, list[float]] = defaultdict(list)
    for r in records:
        values = {label: r.get(label, 0.0) for label, _ in PARTS + DEVICE_PARTS if label != "other"}
        values["host"] = r["total"] - sum(values[label] for label, _ in DEVICE_PARTS)
        values["other"] = values["host"] - sum(values[label] for label, _ in PARTS if label != "other")
        values["total"] = r["total"]
        for k, v in values.items():
            per_part[k].append(v)
    return {k: {"median": sorted(v)[len(v) // 2], "mean": sum(v) / len(v)} for k, v in per_part.items()}


def profile_top(profiler: cProfile.Profile, steps: int, top: int) -> list[str]:
    """The functions with the most own time, in ms per step."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({name})" if line else name
        rows.append((own, cumulative, calls, where))
    rows.sort(reverse=True)
    return [
        f"{1e3 * own / steps:7.3f} own {1e3 * cum / steps:7.3f} cum {calls / steps:7.0f} calls  {where}"
        for own, cum, calls, where in rows[:top]
    ]


def main() -> None:
    args = parse_args()
    vocab = SHAPES[args.shape]["vocab_size"]
    steady = args.warmup + args.steps + args.profile
    # By default: the prefill's token, the first decode, and slack for the last steps.
    output_len = tuple(args.output_len) if args.output_len else (steady + 4, steady + 4)
    seqs = nano_vllm_workload(args.num_seqs, args.seed, tuple(args.input_len), output_len, vocab=vocab)
    max_tokens = max(s.output_len for s in seqs)
    prompt_tokens = sum(len(s.prompt) for s in seqs)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.shape, Path(tmp) / args.shape, "cpu", seed=args.seed)
        # Admission counts a prompt twice against the pool (the step's tokens, and the reserve
        # for running requests, which includes them), so twice the prompts fit in one step.
        engine = Engine(
            str(ckpt), device="cpu", dtype="float32", max_running_requests=args.num_seqs,
            max_prefill_tokens=prompt_tokens, kv_cache_tokens=2 * prompt_tokens + args.num_seqs * (max_tokens + 2),
            overlap_schedule=True, fused_kernels=False, cuda_graphs=False, show_progress=False,
        )
    if args.stub_device:
        stub_device_work(engine.core.runner, args.num_seqs)
    timer = StepTimer(engine, args.warmup, args.steps, args.profile)
    try:
        params = [
            SamplingParams(max_tokens=s.output_len, temperature=0.6, ignore_eos=True, seed=i)
            for i, s in enumerate(seqs)
        ]
        engine.generate([s.prompt for s in seqs], params, progress=False)
    finally:
        engine.shutdown()
    if len(timer.timed) < args.steps:
        raise RuntimeError(f"only {len(timer.timed)} of {args.steps} steps were steady decode steps")
    ms = summarize(timer.timed)
    top = profile_top(timer.profiler, args.profile, args.profile_top) if args.profile else []
    record = {
        "bench": "host_overhead", "shape": args.shape, **environment("cpu"), "num_seqs": args.num_seqs,
        "prompt_tokens": prompt_tokens, "output_len": output_len, "stub_device": args.stub_device,
        "steps": len(timer.timed),
        "ms_per_step": ms, "profile_top": top,
    }
    if args.json:
        emit(record)
        return
    device = "stand-ins for the device work" if args.stub_device else "the device work computed on the CPU"
    print(f"{args.num_seqs} sequences, {prompt_tokens} prompt tokens, output lengths {output_len[0]}-{output_len[1]}, "
          f"{device}; {len(timer.timed)} steady decode steps")
    print(f"{'part':<16}{'median':>9}{'mean':>9}  ms per step")
    rows = [(label, what) for label, what in PARTS]
    rows.append(("host", "the step less the device work (parts summed per step)"))
    rows += [(label, f"{what} (device work, not in host)") for label, what in DEVICE_PARTS]
    for label, what in rows:
        print(f"{label:<16}{ms[label]['median']:9.3f}{ms[label]['mean']:9.3f}  {what}")
    if top:
        print(f"\ncProfile over {args.profile} steady steps, by own time (ms per step):")
        print("\n".join(top))


if __name__ == "__main__":
    main()
