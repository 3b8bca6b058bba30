"""Throughput of RadixTree insert/match/evict, eviction cost vs tree size, and a
trace replay against SGLang's RadixCache.

Prints one JSON line per measurement. The synthetic workload is a serving-like
one: requests share one of a few system prompts and end in a unique suffix, so
the tree is a few long shared nodes with many short leaves.

    python benchmarks/tree_bench.py                      # everything
    python benchmarks/tree_bench.py --sizes 10000 1000000 --evict-ops 1000 --rounds 15
    python benchmarks/tree_bench.py --only trace --peer sglang --capacities 1000000 4000000

Trace replay (``--only trace``): every request of a Mooncake-format trace
(default ../shared/traces/conversation_trace.jsonl, relative to the repository)
becomes token ids as live replay makes them (replay.content), and each cache
serves it as the engine does: match, lock the match, evict until the new
tokens fit the capacity, insert the whole prompt, unlock. Keys reach both
trees as the ``array('q')`` their schedulers pass (``--trace-keys numpy``:
numpy int64 for radixserve); values are slot ids (``array('q')`` or numpy for
radixserve, a torch int64 tensor for SGLang), sliced outside the timed part.
Rounds alternate between the caches and capacities, so that load from other
processes falls on all alike; each reports its best round.

``--peer sglang`` adds SGLang's ``RadixCache`` to the replay and to the
eviction-scaling measurement. SGLang is never a dependency of radixserve:
install it into a venv of its own and point ``--sglang-site`` at that venv's
site-packages; the venv needs no torch (this interpreter's is used)::

    python -m venv /tmp/sglang-venv
    /tmp/sglang-venv/bin/pip install --no-deps sglang==0.5.23 orjson pybase64 \\
        triton starlette msgspec pyzmq dill apache-tvm-ffi sentencepiece \\
        compressed-tensors loguru ipython traitlets

These are the modules that importing its radix cache reaches; numpy,
transformers and torch come from this interpreter's environment.

Without an importable SGLang the script reports radixserve alone.

Eviction cost per leaf must not grow with the tree: ``evict_scaling`` reports
the ratio of the per-leaf cost at the largest size to the smallest (each the
mean of the best of ``--rounds`` rounds, so load from other processes on the
machine disturbs it least). As a
baseline measured in the same run, ``rescan_find`` times what an eviction that
rescans the tree (the O(n) approach) spends just finding its victim.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import glob
import importlib.machinery
import json
import pathlib
import platform
import statistics
import sys
import time
import types
from array import array

import numpy as np

from radixserve.radix_tree import RadixTree
from radixserve.replay.content import prompt_token_array
from radixserve.replay.formats import TraceReader

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "conversation_trace.jsonl"


class Workload:
    """Keys ``prompt[i % n_prompts] + suffix[i]``; request i owns slots
    ``[base[i], base[i] + len(key_i))`` so a freed slot names its request."""

    def __init__(self, rng, n_prompts, prompt_len, n_requests, suffix_len, values) -> None:
        vocab = 32000
        self.prompts = [tuple(rng.integers(0, vocab, prompt_len).tolist()) for _ in range(n_prompts)]
        self.suffixes = [tuple(rng.integers(0, vocab, suffix_len).tolist()) for _ in range(n_requests)]
        self.key_len = prompt_len + suffix_len
        self.bases = [i * self.key_len for i in range(n_requests)]
        self.as_numpy = values == "numpy"

    def __len__(self) -> int:
        return len(self.suffixes)

    def key(self, i: int) -> tuple:
        return self.prompts[i % len(self.prompts)] + self.suffixes[i]

    def value(self, i: int):
        base = self.bases[i]
        if self.as_numpy:
            return np.arange(base, base + self.key_len, dtype=np.int64)
        return list(range(base, base + self.key_len))

    def owner(self, slot: int) -> int:
        return bisect.bisect_right(self.bases, slot) - 1


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def workload_for_size(args, rng, total_tokens: int) -> Workload:
    """A workload whose tree holds about ``total_tokens`` tokens."""
    n_prompts = max(1, min(64, total_tokens // (16 * args.prompt_len)))
    shared = n_prompts * args.prompt_len
    n_requests = max(n_prompts, (total_tokens - shared) // args.suffix_len)
    return Workload(rng, n_prompts, args.prompt_len, n_requests, args.suffix_len, args.values)


def build(args, work: Workload) -> tuple[RadixTree, float]:
    tree = RadixTree(page_size=args.page_size, policy=args.policy)
    start = time.perf_counter()
    for i in range(len(work)):
        tree.insert(work.key(i), work.value(i))
    return tree, time.perf_counter() - start


def throughput_round(args, keys, fresh, values) -> dict[str, float]:
    """One pass over a fresh tree; returns seconds per phase."""
    seconds = {}
    tree = RadixTree(page_size=args.page_size, policy=args.policy)
    start = time.perf_counter()
    for key, value in zip(keys, values):
        tree.insert(key, value)
    seconds["insert"] = time.perf_counter() - start

    start = time.perf_counter()
    hit = sum(tree.match_prefix(key).length for key in keys)
    seconds["match"] = time.perf_counter() - start
    assert hit == sum(map(len, keys)), "every key was inserted, so every match is a full hit"

    # A request's life in the tree: match, lock, insert its new tail, unlock.
    start = time.perf_counter()
    for key, value in zip(fresh, values):
        m = tree.match_prefix(key)
        tree.lock(m.node)
        tree.insert(key, value)
        tree.unlock(m.node)
    seconds["request_cycle"] = time.perf_counter() - start

    leaves = tree.stats()["evictable_leaves"]
    start = time.perf_counter()
    r = tree.evict(tree.total_size)
    seconds["evict_all"] = time.perf_counter() - start
    assert len(r.values) >= leaves and tree.total_size == 0
    seconds["evicted_tokens"], seconds["evicted_leaves"] = r.num_tokens, len(r.values)
    return seconds


def bench_throughput(args, rng) -> None:
    work = Workload(rng, args.prompts, args.prompt_len, args.requests, args.suffix_len, args.values)
    keys = [_as_key_type(work.key(i), args.keys) for i in range(len(work))]
    # Same system prompts, new suffixes: a partial hit and an insert each.
    fresh = [
        _as_key_type(work.prompts[i % len(work.prompts)]
                     + tuple(rng.integers(0, 32000, args.suffix_len).tolist()), args.keys)
        for i in range(len(keys))
    ]
    values = [work.value(i) for i in range(len(work))]
    rounds = [throughput_round(args, keys, fresh, values) for _ in range(args.rounds)]
    ops = len(keys)
    tokens = sum(map(len, keys))
    common = dict(ops=ops, rounds=len(rounds), page_size=args.page_size, policy=args.policy,
                  values=args.values, keys=args.keys)
    for phase in ("insert", "match", "request_cycle"):
        best = min(r[phase] for r in rounds)  # the round least disturbed by other load
        emit(bench=phase, best_seconds=best, ops_per_s=ops / best, tokens_per_s=tokens / best,
             **common)
    best = min(r["evict_all"] for r in rounds)
    emit(bench="evict_all", best_seconds=best, leaves=rounds[0]["evicted_leaves"],
         tokens=rounds[0]["evicted_tokens"], leaves_per_s=rounds[0]["evicted_leaves"] / best,
         tokens_per_s=rounds[0]["evicted_tokens"] / best, **common)


def rescan_find(tree: RadixTree) -> object:
    """The baseline: walk the whole tree to find the policy's first victim."""
    best = None
    stack = [tree.root()]
    key_of = tree.policy.sort_key
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        elif node.lock_ref == 0:
            key = (key_of(node), node.id)
            if best is None or key < best[0]:
                best = (key, node)
    return best[1]


def evict_round(tree: RadixTree, work: Workload, ops: int) -> list[int]:
    """Times ``ops`` single-leaf evictions (ns each), putting each leaf back
    (untimed) so that the tree keeps its size."""
    samples = []
    for _ in range(ops):
        start = time.perf_counter_ns()
        r = tree.evict(1)
        samples.append(time.perf_counter_ns() - start)
        owner = work.owner(int(r.values[0][0]))
        tree.insert(work.key(owner), work.value(owner))
    return samples


def bench_evict_scaling(args, rng, sgl=None) -> None:
    built = {}
    for size in args.sizes:
        work = workload_for_size(args, rng, size)
        built[size] = (*build(args, work), work)
    peers = {size: build_sglang(sgl, work) for size, (_, _, work) in built.items()} if sgl else {}
    gc.collect()
    gc.freeze()  # long-lived trees should not make every gc pass walk them
    # Rounds alternate between the sizes, so that load from other processes
    # on the machine falls on all of them alike; the best round of each size
    # is the one least disturbed.
    samples = {size: [] for size in args.sizes}
    round_means = {size: [] for size in args.sizes}
    rescan_times = {size: [] for size in args.sizes}
    peer_means = {size: [] for size in peers}
    for _ in range(args.rounds):
        for size, (tree, _, work) in built.items():
            batch = evict_round(tree, work, args.evict_ops)
            samples[size] += batch
            round_means[size].append(statistics.mean(batch) / 1000)
            start = time.perf_counter()
            rescan_find(tree)
            rescan_times[size].append((time.perf_counter() - start) * 1e6)
            if size in peers:
                batch = evict_round_sglang(peers[size], sgl, work, args.peer_evict_ops)
                peer_means[size].append(statistics.mean(batch) / 1000)
    per_leaf_us = {size: min(means) for size, means in round_means.items()}
    rescan_us = {size: min(times) for size, times in rescan_times.items()}
    median_us = {size: statistics.median(s) / 1000 for size, s in samples.items()}
    for size, (tree, build_s, _) in built.items():
        emit(bench="evict_one_leaf", target_tokens=size, tree_tokens=tree.total_size,
             nodes=tree.num_nodes, leaves=tree.stats()["evictable_leaves"], build_s=build_s,
             ops=len(samples[size]), best_round_mean_us=per_leaf_us[size],
             median_us=median_us[size], p99_us=_p99(samples[size]) / 1000,
             page_size=args.page_size, policy=args.policy, values=args.values)
        emit(bench="rescan_find", target_tokens=size, nodes=tree.num_nodes,
             ops=len(rescan_times[size]), best_us=rescan_us[size])
        if size in peers:
            emit(bench="evict_one_leaf_sglang", target_tokens=size, sglang_version=sgl.version,
                 tree_tokens=peers[size].size(), ops_per_round=args.peer_evict_ops,
                 best_round_mean_us=min(peer_means[size]),
                 sglang_over_radixserve=min(peer_means[size]) / per_leaf_us[size])
    gc.unfreeze()
    small, large = min(args.sizes), max(args.sizes)
    emit(bench="evict_scaling", small_tokens=small, large_tokens=large,
         evict_ratio=per_leaf_us[large] / per_leaf_us[small],
         evict_ratio_median=median_us[large] / median_us[small],
         rescan_ratio=rescan_us[large] / rescan_us[small],
         rescan_over_evict_at_large=rescan_us[large] / per_leaf_us[large],
         python=platform.python_version(), machine=platform.machine())


# ------------------------------------------------------------- SGLang as a peer


def load_sglang(site: str | None) -> types.SimpleNamespace | None:
    """SGLang's radix cache module and parameter types, or None if not importable."""
    if site:
        sys.path.append(site)  # after this interpreter's own packages: its torch wins
    try:
        # SGLang's package imports torchvision (multimodal preprocessing) on the way to
        # the radix cache, which never uses it: a stand-in module satisfies the import.
        # transformers must first record that the real one is absent.
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        import_utils.is_torchvision_v2_available()
        _stand_in_modules("torchvision", "torchvision.transforms",
                          "torchvision.transforms.functional")
        from sglang.srt.mem_cache import base_prefix_cache, radix_cache
    except Exception as exc:  # any import failure: report radixserve alone
        emit(bench="peer", peer="sglang", available=False, error=f"{type(exc).__name__}: {exc}")
        return None
    import sglang
    import torch

    # SGLang's values are torch tensors (here on the CPU): one thread copies a
    # slice in microseconds, where a parallel copy waits on a busy second core.
    torch.set_num_threads(1)

    return types.SimpleNamespace(
        version=getattr(sglang, "__version__", "?"), torch=torch,
        RadixCache=radix_cache.RadixCache, RadixKey=radix_cache.RadixKey,
        Match=base_prefix_cache.MatchPrefixParams, Insert=base_prefix_cache.InsertParams,
        Evict=base_prefix_cache.EvictParams,
    )


def _stand_in_modules(*names: str) -> None:
    def attr(module: str):
        def get(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return types.SimpleNamespace(__name__=f"{module}.{name}")
        return get

    for name in names:
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__getattr__ = attr(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module


class _StubAllocator:
    """What SGLang's RadixCache needs of a KV allocator: it remembers the last
    freed segment (so an evicted leaf names its request) and counts slots."""

    device = "cpu"

    def __init__(self) -> None:
        self.freed = 0
        self.last = None

    def free_segment(self, indices, start_pos: int = 0) -> None:
        self.freed += len(indices)
        self.last = indices


class RadixservePeer:
    name = "radixserve"

    def __init__(self, tree_class: type = RadixTree) -> None:
        self.tree = tree_class()

    def match(self, key):
        m = self.tree.match_prefix(key)
        return m.length, m.node

    def lock(self, node) -> None:
        self.tree.lock(node)

    def unlock(self, node) -> None:
        self.tree.unlock(node)

    def size(self) -> int:
        return self.tree.total_size

    def evict(self, n: int) -> None:
        self.tree.evict(n)  # the values go back to a stub allocator: nothing to do

    def insert(self, key, value) -> None:
        self.tree.insert(key, value)


class SGLangTouchTree(RadixTree):
    """RadixTree with SGLang's touch rule, to check that the two caches differ
    by that rule alone: SGLang stamps a node's access time before it splits
    it, so a match or insert that ends inside a node also refreshes the lower
    half, which the request does not use. RadixTree refreshes only the path."""

    def _split(self, child, n):
        upper = super()._split(child, n)
        listed = child.evict_entry is not None
        if listed:
            self._unlist(child)
        child.last_access = self._clock.now  # the tick of the ongoing match or insert
        if listed:
            self._relist(child)
        return upper


class SGLangPeer:
    name = "sglang"

    def __init__(self, sgl: types.SimpleNamespace) -> None:
        self.sgl = sgl
        self.allocator = _StubAllocator()
        self.cache = sgl.RadixCache.create_simulated(mock_allocator=self.allocator)

    def match(self, key):
        r = self.cache.match_prefix(self.sgl.Match(key=self.sgl.RadixKey(key)))
        return r.device_prefix_len, r.last_device_node

    def lock(self, node) -> None:
        self.cache.inc_lock_ref(node)

    def unlock(self, node) -> None:
        self.cache.dec_lock_ref(node)

    def size(self) -> int:
        return self.cache.evictable_size_ + self.cache.protected_size_

    def evict(self, n: int) -> None:
        self.cache.evict(self.sgl.Evict(num_tokens=n))

    def insert(self, key, value) -> None:
        self.cache.insert(self.sgl.Insert(key=self.sgl.RadixKey(key), value=value))


def build_sglang(sgl, work: Workload) -> SGLangPeer:
    peer = SGLangPeer(sgl)
    for i in range(len(work)):
        peer.insert(array("q", work.key(i)), _torch_value(sgl, work, i))
    return peer


def evict_round_sglang(peer: SGLangPeer, sgl, work: Workload, ops: int) -> list[int]:
    """``evict_round`` for SGLang's cache: its allocator stub names the evicted leaf."""
    samples = []
    for _ in range(ops):
        start = time.perf_counter_ns()
        peer.evict(1)
        samples.append(time.perf_counter_ns() - start)
        owner = work.owner(int(peer.allocator.last[0]))
        peer.insert(array("q", work.key(owner)), _torch_value(sgl, work, owner))
    return samples


def _torch_value(sgl, work: Workload, i: int):
    return sgl.torch.arange(work.bases[i], work.bases[i] + work.key_len, dtype=sgl.torch.int64)


# ------------------------------------------------------------------ trace replay


def load_trace_keys(path: str, limit: int | None) -> list[array]:
    """Each request's prompt as an ``array('q')`` of token ids (replay.content)."""
    keys = []
    for req in TraceReader(path):
        if limit is not None and len(keys) >= limit:
            break
        key = array("q")
        key.frombytes(prompt_token_array(req).astype(np.int64, copy=False).tobytes())
        keys.append(key)
    return keys


def replay(peer, keys: list, values, capacity: int) -> dict:
    """One pass of the trace through ``peer`` at ``capacity`` tokens; the slices
    of ``values`` are made outside the timed part."""
    clock = time.perf_counter_ns
    match_ns = evict_ns = insert_ns = 0
    hits = array("q")
    uncacheable = evict_calls = 0
    for key in keys:
        n = len(key)
        value = values[:n]
        t0 = clock()
        hit, node = peer.match(key)
        t1 = clock()
        cache = n <= capacity  # a prompt larger than the cache is not cached
        if cache:
            peer.lock(node)
            over = peer.size() + n - hit - capacity
            if over > 0:
                peer.evict(over)
                evict_calls += 1
        t2 = clock()
        if cache:
            peer.insert(key, value)
            peer.unlock(node)
        t3 = clock()
        match_ns += t1 - t0
        evict_ns += t2 - t1
        insert_ns += t3 - t2
        hits.append(hit)
        uncacheable += not cache
    return dict(match_ns=match_ns, evict_ns=evict_ns, insert_ns=insert_ns, hits=hits,
                uncacheable=uncacheable, evict_calls=evict_calls, cached=peer.size())


def bench_trace(args, sgl) -> None:
    start = time.perf_counter()
    keys = load_trace_keys(args.trace, args.trace_requests)
    longest = max(map(len, keys))
    load_s = time.perf_counter() - start
    if args.trace_keys == "numpy":
        rs_keys = [np.frombuffer(k, dtype=np.int64) for k in keys]  # views, no copy
        rs_values = np.arange(longest, dtype=np.int64)
    else:
        rs_keys, rs_values = keys, array("q", range(longest))
    runs = [("radixserve", lambda: RadixservePeer(), rs_keys, rs_values)]
    if sgl is not None:
        sgl_values = sgl.torch.arange(longest, dtype=sgl.torch.int64)
        runs.append(("sglang", lambda: SGLangPeer(sgl), keys, sgl_values))
    best: dict[tuple[str, int], dict] = {}
    hits: dict[tuple[str, int], array] = {}
    for _ in range(args.trace_rounds):
        for capacity in args.capacities:
            for name, make, peer_keys, values in runs:
                peer = make()
                gc.collect()
                r = replay(peer, peer_keys, values, capacity)
                r["total_ns"] = r["match_ns"] + r["evict_ns"] + r["insert_ns"]
                del peer
                k = (name, capacity)
                if k in hits and hits[k] != r["hits"]:
                    raise RuntimeError(f"{name} at {capacity}: hits differ between rounds")
                hits[k] = r["hits"]
                if k not in best or r["total_ns"] < best[k]["total_ns"]:
                    best[k] = r
    n = len(keys)
    tokens = sum(map(len, keys))
    for (name, capacity), r in best.items():
        emit(bench="trace_replay", peer=name, capacity=capacity, requests=n, tokens=tokens,
             rounds=args.trace_rounds, keys=args.trace_keys if name == "radixserve" else "array",
             us_per_request=r["total_ns"] / n / 1000, match_us=r["match_ns"] / n / 1000,
             lock_evict_us=r["evict_ns"] / n / 1000, insert_unlock_us=r["insert_ns"] / n / 1000,
             hit_tokens=sum(r["hits"]), evict_calls=r["evict_calls"],
             uncacheable=r["uncacheable"], cached_tokens_at_end=r["cached"],
             trace_load_s=load_s, python=platform.python_version(), machine=platform.machine())
    if sgl is not None:
        for capacity in args.capacities:
            ours, theirs = best[("radixserve", capacity)], best[("sglang", capacity)]
            same = ours["hits"] == theirs["hits"]
            differing = sum(a != b for a, b in zip(ours["hits"], theirs["hits"]))
            # Untimed: the same replay with SGLang's touch rule must give its hits exactly.
            rule = replay(RadixservePeer(SGLangTouchTree), rs_keys, rs_values, capacity)
            emit(bench="trace_vs_sglang", capacity=capacity, sglang_version=sgl.version,
                 sglang_over_radixserve=theirs["total_ns"] / ours["total_ns"],
                 match_ratio=theirs["match_ns"] / ours["match_ns"],
                 evict_ratio=theirs["evict_ns"] / ours["evict_ns"],
                 insert_ratio=theirs["insert_ns"] / ours["insert_ns"],
                 hit_tokens=sum(ours["hits"]), sglang_hit_tokens=sum(theirs["hits"]),
                 hit_tokens_identical=same, requests_with_other_hits=differing,
                 identical_with_sglang_touch_rule=rule["hits"] == theirs["hits"])


def _as_key_type(key: tuple, kind: str):
    if kind == "list":
        return list(key)
    if kind == "numpy":
        return np.array(key, dtype=np.int64)
    if kind == "array":
        return array("q", key)
    return key


def _p99(samples: list[int]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--policy", default="lru", choices=["lru", "lfu", "fifo", "priority"])
    parser.add_argument("--values", default="numpy", choices=["numpy", "list"],
                        help="type of the slot-id values inserted")
    parser.add_argument("--keys", default="list", choices=["list", "tuple", "numpy", "array"],
                        help="type of the token keys passed to insert/match (throughput part)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct system prompts")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=64, help="unique tokens per request")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="cached tokens for the eviction-scaling measurement")
    parser.add_argument("--evict-ops", type=int, default=1000, help="timed evictions per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--peer-evict-ops", type=int, default=20,
                        help="timed SGLang evictions per round (each rebuilds its heap)")
    parser.add_argument("--only", choices=["throughput", "scaling", "trace"], default=None)
    parser.add_argument("--peer", choices=["none", "sglang"], default="none",
                        help="also drive SGLang's RadixCache (trace replay and eviction scaling)")
    parser.add_argument("--sglang-site", default=_default_sglang_site(),
                        help="site-packages of a venv holding sglang (appended to sys.path)")
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format trace")
    parser.add_argument("--trace-requests", type=int, default=None, help="first N requests only")
    parser.add_argument("--capacities", type=int, nargs="+", default=[1_000_000, 4_000_000],
                        help="cache capacities in tokens for the trace replay")
    parser.add_argument("--trace-rounds", type=int, default=3)
    parser.add_argument("--trace-keys", choices=["array", "numpy"], default="array",
                        help="key and value type radixserve gets in the trace replay")
    args = parser.parse_args()
    if args.suffix_len % args.page_size or args.prompt_len % args.page_size:
        parser.error("--prompt-len and --suffix-len must be multiples of --page-size")
    rng = np.random.default_rng(args.seed)
    sgl = load_sglang(args.sglang_site) if args.peer == "sglang" else None
    if args.only in (None, "throughput"):
        bench_throughput(args, rng)
    if args.only in (None, "scaling"):
        bench_evict_scaling(args, rng, sgl)
    if args.only in (None, "trace"):
        if pathlib.Path(args.trace).is_file():
            bench_trace(args, sgl)
        elif args.only == "trace":
            parser.error(f"--trace: no file at {args.trace}")
        else:
            emit(bench="trace_replay", skipped=f"no trace at {args.trace} (--trace)")


def _default_sglang_site() -> str | None:
    found = sorted(glob.glob("/tmp/sglang-venv/lib/python3*/site-packages"))
    return found[-1] if found else None


if __name__ == "__main__":
    main()
