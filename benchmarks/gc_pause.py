"""The collector's full-pass pause while many long requests are live (host only, any device).

Submits SGLang's generated-shared-prefix workload (64 groups x 16 prompts of
2,048 + 128 random ids by default) to an engine on the tiny model, then times
`gc.collect()` four times while every request is still queued or running: what
a full collection costs the engine loop at that load. Objects that exist before
the requests arrive are frozen first (as the engine does at start on CUDA).
Prints one JSON line.

    python benchmarks/gc_pause.py
"""

from __future__ import annotations

import argparse
import gc
import queue
import time

from _workloads import emit, random_checkpoint

from radixserve import Engine, SamplingParams
from radixserve.replay.gentrace import GenConfig, generate_trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    args = p.parse_args()
    ckpt = random_checkpoint("tiny", "/tmp/radixserve-tiny", "cpu", seed=0)
    n = args.groups * args.prompts_per_group
    tokens = n * (args.system_prompt_len + args.question_len)
    engine = Engine(str(ckpt), device="cpu", dtype="float32", max_running_requests=n,
                    max_prefill_tokens=2048, kv_cache_tokens=tokens + 64 * n)
    cfg = GenConfig(groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_prompt_len,
                    question_len=args.question_len, output_len=8, seed=0, token_range=(0, 1000))
    prompts = [r["input_ids"] for r in generate_trace(cfg)]
    gc.collect()
    gc.freeze()  # what exists before requests arrive (the engine freezes at start on CUDA)
    items = engine._prepare_many(prompts, SamplingParams(max_tokens=64, temperature=0.6, ignore_eos=True))
    del prompts
    sinks: dict[str, queue.SimpleQueue] = {}

    def sink_for(rid: str):
        sinks[rid] = queue.SimpleQueue()
        return sinks[rid].put

    trackers = engine._submit(items, sink_for, stream=False)
    del items
    pauses = []
    for _ in range(4):
        start = time.perf_counter()
        gc.collect()
        pauses.append(round(1e3 * (time.perf_counter() - start), 1))
    tracked = len(gc.get_objects())
    for t in trackers:
        engine.abort(t.rid)
    engine.shutdown()
    emit({"bench": "gc_pause", "live_requests": n, "prompt_tokens": tokens, "full_collection_ms": pauses,
          "tracked_objects": tracked})


if __name__ == "__main__":
    main()
