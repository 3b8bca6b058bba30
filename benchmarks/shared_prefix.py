"""SGLang's generated-shared-prefix workload: the prefix cache on against off, in one run.

Workload (SGLang bench_serving `generated-shared-prefix`): 64 groups x 16
prompts; each group shares a 2048-token system prompt, each prompt adds its
own 128-token question; 256 output tokens each; all requests submitted at once,
in shuffled order. Tokens are random ids; the model is a Qwen3 shape with
random weights unless --model is given (as in throughput.py).

Prints one JSON line: prompt and output tokens/s and the cache hit rate, for
our engine with the prefix cache on and with it off, and their speed ratio.
Within-batch folding stays at the engine's default in both (so requests that
arrive in one batch share their prefix even with the cache off); add
--no-fold-baseline for a run that shares nothing.

    python benchmarks/shared_prefix.py
    python benchmarks/shared_prefix.py --groups 16 --prompts-per-group 16 --output-len 128   # shorter
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from _workloads import Seq, Timer, add_engine_args, emit, engine_kwargs, environment, free_memory, random_checkpoint
from radixserve import Engine, SamplingParams
from radixserve.replay.gentrace import GenConfig, generate_trace


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--no-shuffle", action="store_true", help="submit group by group")
    p.add_argument("--fold-mode", help="within-batch folding for every run (default: the engine's)")
    p.add_argument("--no-fold-baseline", action="store_true",
                   help="add a third run: cache off and folding off (nothing shared at all)")
    return p.parse_args()


def shared_prefix_workload(args: argparse.Namespace, vocab: int = 10000) -> list[Seq]:
    """SGLang's generated-shared-prefix workload, from the generator `radixserve gen-trace` uses."""
    cfg = GenConfig(
        groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_prompt_len,
        question_len=args.question_len, output_len=args.output_len, seed=args.seed, token_range=(0, vocab),
    )
    # The generator interleaves groups at random; --no-shuffle submits group by group.
    records = list(generate_trace(cfg))
    if args.no_shuffle:
        records.sort(key=lambda r: r["input_ids"][: args.system_prompt_len])
    return [Seq(r["input_ids"], r["output_len"]) for r in records]


def run(ckpt: Path, seqs: list[Seq], args: argparse.Namespace, prefix_cache: bool, fold: str | None) -> dict[str, Any]:
    extra = {} if fold is None else {"fold_mode": fold}
    engine = Engine(str(ckpt), enable_prefix_cache=prefix_cache, **extra, **engine_kwargs(args))
    try:
        # Warm-up on unrelated prompts (kernel compilation), then an empty cache.
        warm = [[7] * 300 + [i] * 50 for i in range(4)]
        engine.generate(warm, SamplingParams(max_tokens=4, temperature=0.6, ignore_eos=True), progress=False)
        engine.flush_cache()
        before = engine.stats()
        params = [SamplingParams(max_tokens=s.output_len, temperature=0.6, ignore_eos=True, seed=i)
                  for i, s in enumerate(seqs)]
        with Timer() as t:
            outs = engine.generate([s.prompt for s in seqs], params, progress=False)
        after = engine.stats()
        fold_mode = engine.config.fold_mode
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
        "time_s": t.seconds,
        "prompt_tok_s": prompt_tokens / t.seconds,
        "output_tok_s": output_tokens / t.seconds,
        "cache_hit_rate": (after["hit_tokens"] - before["hit_tokens"]) / queried if queried else 0.0,
        "computed_tokens": after["computed_tokens"] - before["computed_tokens"],
        "steps": after["steps"] - before["steps"],
        "retractions": after["retractions"] - before["retractions"],
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("radixserve.model_runner.attention").setLevel(logging.INFO)
    ckpt = Path(args.model) if args.model else random_checkpoint(
        args.shape, args.ckpt_dir or f"/tmp/radixserve-{args.shape}", args.device, seed=args.seed
    )
    seqs = shared_prefix_workload(args)
    on = run(ckpt, seqs, args, prefix_cache=True, fold=args.fold_mode)
    off = run(ckpt, seqs, args, prefix_cache=False, fold=args.fold_mode)
    extra = {}
    if args.no_fold_baseline:
        bare = run(ckpt, seqs, args, prefix_cache=False, fold="off")
        extra = {"cache_off_fold_off": bare, "speedup_cache_on_vs_nothing_shared": bare["time_s"] / on["time_s"]}
    emit({
        "bench": "shared_prefix", "shape": args.model or args.shape, **environment(args.device),
        "workload": {
            "groups": args.groups, "prompts_per_group": args.prompts_per_group,
            "system_prompt_len": args.system_prompt_len, "question_len": args.question_len,
            "output_len": args.output_len, "shuffled": not args.no_shuffle,
            "prompt_tokens": sum(len(s.prompt) for s in seqs),
        },
        "cache_on": on, "cache_off": off,
        "speedup_cache_on_vs_off": off["time_s"] / on["time_s"],
        **extra,
    })


if __name__ == "__main__":
    main()
