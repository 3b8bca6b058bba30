"""Within-batch folding: prefill-only forward time per fold mode, in one run.

Two workloads, each timed for fold_mode off, mlp and tree on the same engine
settings (prefix cache off, so every token is either computed or folded):

- RadixMLP's synthetic setup: a batch of B sequences sharing a prefix of P
  tokens, each with a unique suffix of S tokens, last-token pooling.
- A reranker: one system prompt + one query shared by N passages (~200 tokens).

Prints one JSON line per (workload, mode) with tokens/s and the speedup over
`off` measured in the same run. Random weights unless --model is given.

    python benchmarks/fold_bench.py --shape cpu-small --device cpu      # CPU
    python benchmarks/fold_bench.py --shape qwen3-0.6b --device cuda    # the issue's setup
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from _workloads import SHAPES, random_checkpoint


def synthetic_batches(batch: int, prefixes: list[int], suffixes: list[int], vocab: int, seed: int):
    rng = random.Random(seed)
    for p in prefixes:
        for s in suffixes:
            prefix = [rng.randrange(1, vocab) for _ in range(p)]
            prompts = [prefix + [rng.randrange(1, vocab) for _ in range(s)] for _ in range(batch)]
            yield f"radixmlp_b{batch}_p{p}_s{s}", prompts


def reranker_batch(passages: int, vocab: int, seed: int):
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(300)]
    query = [rng.randrange(1, vocab) for _ in range(40)]
    docs = [[rng.randrange(1, vocab) for _ in range(rng.randrange(180, 221))] for _ in range(passages)]
    return f"reranker_{passages}x200", [system + query + d for d in docs]


def time_embed(engine, prompts: list[list[int]], repeat: int) -> float:
    """Best wall time of a whole-batch prefill (embed returns only after the device finished)."""
    engine.embed(prompts[:2], pooling="last")  # warm up kernels and allocator
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine.embed(prompts, pooling="last")
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: random weights of --shape)")
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, default=15)
    ap.add_argument("--prefixes", type=int, nargs="+", default=[0, 127, 511, 2047])
    ap.add_argument("--suffixes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["off", "mlp", "tree"])
    args = ap.parse_args()

    from radixserve import Engine

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_checkpoint(args.shape, Path(tmp) / args.shape, args.device))
        vocab = SHAPES[args.shape]["vocab_size"] if args.model is None else 30000
        workloads = list(synthetic_batches(args.batch, args.prefixes, args.suffixes, vocab, seed=0))
        workloads.append(reranker_batch(args.passages, vocab, seed=1))
        max_tokens = max(sum(len(p) for p in prompts) for _, prompts in workloads)
        times: dict[tuple[str, str], float] = {}
        for mode in args.modes:
            engine = Engine(
                model, device=args.device, dtype=args.dtype, enable_prefix_cache=False, fold_mode=mode,
                fold_threshold=1.0, max_prefill_tokens=max_tokens, kv_cache_tokens=max_tokens + 64,
                max_running_requests=max(args.batch, args.passages),
            )
            for name, prompts in workloads:
                times[(name, mode)] = time_embed(engine, prompts, args.repeat)
            engine.shutdown()
        for name, prompts in workloads:
            tokens = sum(len(p) for p in prompts)
            for mode in args.modes:
                t = times[(name, mode)]
                print(json.dumps({
                    "bench": "fold", "workload": name, "mode": mode, "model": args.model or args.shape,
                    "device": args.device, "tokens": tokens, "seconds": round(t, 5),
                    "tokens_per_s": round(tokens / t, 1),
                    "speedup_vs_off": round(times[(name, "off")] / t, 3) if "off" in args.modes else None,
                }))


if __name__ == "__main__":
    main()
