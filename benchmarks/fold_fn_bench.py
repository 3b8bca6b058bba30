"""Speed of `compute_fold_and_scatter` against the naive per-token dict trie.

Prints one JSON line per batch shape: our time (best of several runs), the
trie's time on the same batch (given Python lists, its best case) and their
ratio. Run pinned to one core, as the 1 ms budget is per core:

    taskset -c 0 python benchmarks/fold_fn_bench.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np

from radixserve.scheduler.fold_plan import build_fold_plan
from radixserve.scheduler.folding import compute_fold_and_scatter, fold_rows_trie

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def make_batch(
    num_seqs: int, seq_len: int, shared: float, groups: int = 1, seed: int = 0
) -> Batch:
    """`num_seqs` sequences of `seq_len`; each of `groups` groups shares its
    first `shared * seq_len` tokens, the rest is random. Positions start at 0."""
    rng = np.random.default_rng(seed)
    n_shared = int(round(shared * seq_len))
    prefixes = rng.integers(0, 150_000, size=(groups, n_shared))
    rows = []
    for s in range(num_seqs):
        tail = rng.integers(0, 150_000, size=seq_len - n_shared)
        rows.append(np.concatenate([prefixes[s % groups], tail]))
    ids = np.concatenate(rows).astype(np.int64)
    pos = np.tile(np.arange(seq_len, dtype=np.int64), num_seqs)
    cu = np.arange(num_seqs + 1, dtype=np.int64) * seq_len
    return ids, pos, cu


def make_tree_batch(num_seqs: int, seq_len: int, branch: int, seed: int = 0) -> Batch:
    """A random trie: sequence s copies a random earlier sequence up to a random
    depth, then diverges (few-shot prompts, beam-like fan-out)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 150_000, size=seq_len)]
    for _ in range(1, num_seqs):
        donor = rows[int(rng.integers(0, min(len(rows), branch)))]
        cut = int(rng.integers(0, seq_len))
        rows.append(np.concatenate([donor[:cut], rng.integers(0, 150_000, size=seq_len - cut)]))
    ids = np.concatenate(rows).astype(np.int64)
    pos = np.tile(np.arange(seq_len, dtype=np.int64), num_seqs)
    cu = np.arange(num_seqs + 1, dtype=np.int64) * seq_len
    return ids, pos, cu


def best_time(fn: Callable[[], object], min_total_s: float = 0.3, repeats: int = 7) -> float:
    """Best per-call seconds over `repeats` timing loops of ~min_total_s/repeats each."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_total_s / repeats / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def run_case(name: str, batch: Batch, quick: bool) -> dict:
    ids, pos, cu = batch
    ours = compute_fold_and_scatter(ids, pos, cu)
    lids, lpos, lcu = ids.tolist(), pos.tolist(), cu.tolist()
    scatter, gather = fold_rows_trie(lids, lpos, lcu)
    if ours.scatter.tolist() != scatter or ours.fold_gather.tolist() != gather:
        raise RuntimeError(f"{name}: fold disagrees with the trie")
    t_ours = best_time(lambda: compute_fold_and_scatter(ids, pos, cu), 0.1 if quick else 0.5)
    t_trie = best_time(lambda: fold_rows_trie(lids, lpos, lcu), 0.1 if quick else 0.5, 3)
    return {
        "bench": "fold_fn",
        "case": name,
        "tokens": int(ids.size),
        "seqs": int(cu.size - 1),
        "compact_rows": int(ours.fold_gather.size),
        "fold_ratio": round(ours.fold_gather.size / max(ids.size, 1), 4),
        "ours_us": round(t_ours * 1e6, 1),
        "trie_us": round(t_trie * 1e6, 1),
        "speedup_vs_trie": round(t_trie / t_ours, 1),
    }


def run_plan_case(name: str, batch: Batch, num_roots: int, quick: bool) -> dict:
    """build_fold_plan on per-sequence numpy arrays, sequences spread over roots."""
    ids, pos, cu = batch
    seq_ids = [ids[a:b] for a, b in zip(cu[:-1], cu[1:])]
    seq_pos = [pos[a:b] for a, b in zip(cu[:-1], cu[1:])]
    roots = [f"node{s % num_roots}" for s in range(len(seq_ids))]
    groups = [s % num_roots for s in range(len(seq_ids))]
    plan = build_fold_plan(seq_ids, seq_pos, roots)
    lids, lpos, lcu = ids.tolist(), pos.tolist(), cu.tolist()
    if plan.scatter.tolist() != fold_rows_trie(lids, lpos, lcu, groups)[0]:
        raise RuntimeError(f"{name}: plan disagrees with the trie")
    t_ours = best_time(lambda: build_fold_plan(seq_ids, seq_pos, roots), 0.1 if quick else 0.5)
    t_trie = best_time(lambda: fold_rows_trie(lids, lpos, lcu, groups), 0.1 if quick else 0.5, 3)
    return {
        "bench": "fold_plan",
        "case": name,
        "tokens": int(ids.size),
        "seqs": len(seq_ids),
        "roots": num_roots,
        "fold_ratio": round(plan.fold_ratio, 4),
        "ours_us": round(t_ours * 1e6, 1),
        "trie_us": round(t_trie * 1e6, 1),
        "speedup_vs_trie": round(t_trie / t_ours, 1),
    }


def cases() -> list[tuple[str, Batch]]:
    out: list[tuple[str, Batch]] = []
    for shared in (0.0, 0.25, 0.5, 0.9, 1.0):
        out.append((f"16k/64 shared={shared}", make_batch(64, 256, shared)))
    out.append(("16k/64 no common first token", make_batch(64, 256, 0.0, groups=64)))
    out.append(("16k/64 8 groups shared=0.5", make_batch(64, 256, 0.5, groups=8)))
    out.append(("16k/64 half unique", _half_unique()))
    out.append(("16k/64 random trie", make_tree_batch(64, 256, branch=64)))
    out.append(("16k/16 x1024 shared=0.5", make_batch(16, 1024, 0.5)))
    out.append(("16k/4 x4096 shared=0.5", make_batch(4, 4096, 0.5)))
    out.append(("16k/1024 x16 shared=0.5", make_batch(1024, 16, 0.5)))
    out.append(("16k/1024 x16 random trie", make_tree_batch(1024, 16, branch=1024)))
    out.append(("2k/16 x128 shared=0.5", make_batch(16, 128, 0.5)))
    out.append(("128k/128 x1024 shared=0.5", make_batch(128, 1024, 0.5)))
    return out


def _half_unique() -> Batch:
    """32 sequences share half their tokens; 32 share nothing with anyone."""
    a_ids, a_pos, _ = make_batch(32, 256, 0.5, seed=1)
    b_ids, b_pos, _ = make_batch(32, 256, 0.0, groups=32, seed=2)
    cu = np.arange(65, dtype=np.int64) * 256
    return np.concatenate([a_ids, b_ids]), np.concatenate([a_pos, b_pos]), cu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    args = parser.parse_args()
    print(json.dumps({"bench": "fold_fn", "numpy": np.__version__, "python": platform.python_version(),
                      "cpu": platform.processor() or platform.machine()}))
    for name, batch in cases():
        print(json.dumps(run_case(name, batch, args.quick)), flush=True)
    plan_batch = make_batch(64, 256, 0.5)
    for roots in (1, 4):
        name = f"plan 16k/64 shared=0.5 roots={roots}"
        print(json.dumps(run_plan_case(name, plan_batch, roots, args.quick)), flush=True)


if __name__ == "__main__":
    main()
