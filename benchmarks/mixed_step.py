"""Host and GPU time of one eager step (prefill chunks mixed with decodes), by batch shape.

A decode step replays a CUDA graph; a step that also prefills runs the model
eagerly, and under a server's steady arrivals most steps do (every step admits
someone). This measures such a step in isolation: `--decodes` requests of
`--groups` shared system prompts (`--system-len` + `--question-len` tokens)
are prefilled and decoding; then each repetition admits `--new` more requests of
the same groups (their system prompt cached, so each prefills its question) and
runs one step:

    schedule   Scheduler.schedule (admission, batch build, fold and cascade plans)
    launch     ModelRunner.forward + sampling, host time (the GPU idle before it)
    gpu        from the launch's start until the GPU finishes (a sync)
    process    Scheduler.process

with the host's Python of the launch by function (cProfile, `--profile`) and
the GPU's kernel time by category (torch.profiler, `--kernels`). Medians over
`--reps` repetitions; every repetition's requests finish before the next.

`--busy-ms N` queues N ms of GPU work (a spin) before each launch, as the
previous step of an overlapped loop would be (`gpu` then includes it): a launch
that returns in its own time did not wait for the GPU; one that takes N ms more
waited somewhere. `--sync-debug` runs the last launch under torch's sync debug
mode and lists each synchronizing torch call with the engine's frames that made it.

    python benchmarks/mixed_step.py --device cuda                         # online-like: 4 new, 128 decoding
    python benchmarks/mixed_step.py --device cuda --new 64 --decodes 960  # the shared-prefix run's ramp
    python benchmarks/mixed_step.py --shape tiny --device cpu --reps 2    # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _workloads import (
    _profiled,
    add_engine_args,
    emit,
    engine_kwargs,
    environment,
    random_checkpoint,
)

from radixserve import SamplingParams
from radixserve.engine.config import EngineConfig
from radixserve.engine.core import EngineCore
from radixserve.scheduler.request import Req


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--decodes", type=int, default=128, help="requests decoding when the timed steps run")
    p.add_argument("--new", type=int, default=4, help="requests admitted by each timed step")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", type=int, default=25, help="print this many functions of the launch's cProfile")
    p.add_argument("--kernels", action="store_true", help="also the GPU's kernel time by category")
    p.add_argument("--busy-ms", type=float, default=0.0, help="GPU work queued before each launch (CUDA)")
    p.add_argument("--sync-debug", action="store_true", help="list the last launch's synchronizing calls (CUDA)")
    args = p.parse_args()
    args.max_running = max(args.max_running, args.decodes + args.new)

    ckpt = Path(args.model) if args.model else random_checkpoint(
        args.shape, args.ckpt_dir or f"/tmp/radixserve-{args.shape}", args.device)
    # Steps run one by one here (schedule, launch, sync, process): no overlap to undo.
    core = EngineCore(EngineConfig(**{**engine_kwargs(args), "overlap_schedule": False}), ckpt)
    vocab = min(core.runner.vocab_size, 10000)
    rng = random.Random(args.seed)
    systems = [[rng.randrange(vocab) for _ in range(args.system_len)] for _ in range(args.groups)]
    counter = iter(range(1 << 30))
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    busy = spin_for(args.busy_ms) if cuda and args.busy_ms > 0 else (lambda: None)

    def requests(n: int, max_tokens: int) -> list[Req]:
        out = []
        for _ in range(n):
            i = next(counter)
            prompt = tuple(systems[i % args.groups] + [rng.randrange(vocab) for _ in range(args.question_len)])
            params = SamplingParams(max_tokens=max_tokens, temperature=0.6, ignore_eos=True)
            out.append(Req(f"r{i}", prompt, params, seed=i))
        return out

    sched = core.scheduler
    # The decoding requests: long enough to outlive every timed step.
    core.add(requests(args.decodes, max_tokens=10 * args.reps + 1000))
    while sched.waiting or any(r.kv_len < len(r.prompt_ids) for r in sched.running):
        core.step()
    for _ in range(2):
        core.step()

    rows: list[dict[str, float]] = []
    host = cProfile.Profile()
    shape: dict[str, Any] = {}
    for rep in range(args.reps + 1):  # the first is a warm-up
        core.add(requests(args.new, max_tokens=1))  # done after this step: the next starts alike
        sync()
        t0 = time.perf_counter()
        batch = sched.schedule()
        busy()
        t1 = time.perf_counter()
        if rep == args.reps:
            host.enable()
        with SyncLog(cuda and args.sync_debug and rep == args.reps) as syncs:
            launched = core._launch(batch, None)
        if rep == args.reps:
            host.disable()
        t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        core._complete(launched)
        t4 = time.perf_counter()
        if rep:
            rows.append({"schedule": t1 - t0, "launch": t2 - t1, "gpu": t3 - t1, "process": t4 - t3})
        fb = batch.forward
        shape = {"sequences": fb.batch_size, "rows": fb.num_tokens, "planned_tokens": sum(batch.extend_lens),
                 "cascade_groups": 0 if fb.cascade is None else len(fb.cascade.group_sizes)}
    median = {k: round(1e3 * sorted(r[k] for r in rows)[len(rows) // 2], 2) for k in rows[0]}
    stats = pstats.Stats(host, stream=io.StringIO())
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.profile]  # by own time
    record: dict[str, Any] = {
        "bench": "mixed_step", "shape": args.model or args.shape, **environment(args.device),
        "groups": args.groups, "system_len": args.system_len, "question_len": args.question_len,
        "decodes": args.decodes, "new": args.new, "reps": args.reps, "busy_ms": args.busy_ms,
        "batch": shape, "median_ms": median,
        "launch_calls": sum(v[1] for v in stats.stats.values()),
        "launch_own_ms": [f"{1e3 * tt:.2f} {n}x {f[2]} ({Path(f[0]).name}:{f[1]})" for f, (_, n, tt, _, _) in top],
    }
    if args.sync_debug:
        record["syncs"] = syncs.calls
    if args.kernels and cuda:
        def one_step() -> int:
            core.add(requests(args.new, max_tokens=1))
            core._complete(core._launch(sched.schedule(), None))
            return 1

        record["kernels"] = _profiled(one_step, args.device)
    emit(record)


def spin_for(ms: float) -> Callable[[], None]:
    """A function that queues about `ms` of GPU work (torch.cuda._sleep, calibrated here)."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # first use loads the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_ms = cycles / start.elapsed_time(end)
    return lambda: torch.cuda._sleep(int(ms * per_ms))


class SyncLog:
    """Within the block, torch's sync debug mode warns at each call that waits for the GPU;
    `calls` collects them as (message, the innermost radixserve frames) with a count."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.calls: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}

    def __enter__(self) -> SyncLog:
        if self.on:
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)

    def _record(self, message: Any, *args: Any, **kwargs: Any) -> None:
        frames = tuple(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
            if "radixserve" in f.filename
        )[-4:]
        key = (str(message).splitlines()[0][:120], frames)
        if key not in self._seen:
            self._seen[key] = {"message": key[0], "frames": list(frames), "count": 0}
            self.calls.append(self._seen[key])
        self._seen[key]["count"] += 1


if __name__ == "__main__":
    main()
