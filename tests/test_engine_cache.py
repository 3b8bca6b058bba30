"""The prefix cache never changes an answer: cache on/off, arrival order, chunk sizes,
eviction and retraction all give identical greedy tokens. Drives EngineCore step by step."""

from __future__ import annotations

import gc
import random

import pytest

from radixserve.engine.config import EngineConfig
from radixserve.engine.core import EngineCore
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.request import Req


def shared_prefix_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts that share prefixes in every way: common stems, duplicates, one inside another."""
    stems = [[rng.randrange(1, 500) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    prompts = []
    for _ in range(n):
        kind = rng.random()
        stem = rng.choice(stems)
        if kind < 0.15 and prompts:
            prompts.append(list(rng.choice(prompts)))  # identical to an earlier one
        elif kind < 0.3:
            prompts.append(stem[: rng.randrange(1, len(stem) + 1)])  # contained in the stem
        else:
            prompts.append(stem + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 20))])
    return prompts


def run_core(
    path, prompts, params, *, arrivals=None, aborts=None, **options
) -> tuple[list[list[int]], EngineCore, list[Req]]:
    """Run prompts through a fresh EngineCore; request i (rid f"r{i}") arrives before step
    arrivals[i]; aborts maps a step to the rid aborted before it."""
    config = EngineConfig(model=str(path), device="cpu", check_invariants=True, show_progress=False, **options)
    core = EngineCore(config, path)
    arrivals = arrivals or [0] * len(prompts)
    aborts = aborts or {}
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    reqs = [Req(f"r{i}", p, sp, seed=1234 + i) for i, (p, sp) in enumerate(zip(prompts, params))]
    order = sorted(range(len(reqs)), key=lambda i: arrivals[i])
    step = 0
    while order or core.has_work():
        while order and arrivals[order[0]] <= step:
            core.add([reqs[order.pop(0)]])
        if step in aborts:
            core.abort(aborts[step])
        core.step()
        step += 1
        assert step < 10_000, "engine made no progress"
    assert all(r.finished for r in reqs)
    core.check_invariants()
    assert core.flush_cache()
    assert core.runner.allocator.num_free == core.kv_capacity
    return [list(r.output_ids) for r in reqs], core, reqs


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_on_off_and_arrival_order_agree(tiny_qwen3_path, seed):
    rng = random.Random(seed)
    prompts = shared_prefix_prompts(rng, 12)
    # Reference: each request alone, no cache.
    alone = [run_core(tiny_qwen3_path, [p], GREEDY, enable_prefix_cache=False)[0][0] for p in prompts]
    arrivals = [rng.randrange(0, 20) for _ in prompts]
    chunk = rng.choice([3, 8, 64])
    on, core, reqs = run_core(tiny_qwen3_path, prompts, GREEDY, arrivals=arrivals, max_prefill_tokens=chunk)
    off, _, _ = run_core(
        tiny_qwen3_path, prompts, GREEDY, arrivals=arrivals, max_prefill_tokens=chunk, enable_prefix_cache=False
    )
    assert on == alone
    assert off == alone
    # Shared prefixes were served from the tree.
    assert core.stats()["hit_tokens"] > 0
    assert sum(r.cached_tokens for r in reqs) == core.stats()["hit_tokens"]


@pytest.mark.parametrize("page_size", [2, 4])
def test_page_size_keeps_outputs_and_matches_whole_pages(tiny_qwen3_path, page_size):
    rng = random.Random(11)
    prompts = shared_prefix_prompts(rng, 8)
    arrivals = [rng.randrange(0, 10) for _ in prompts]
    off, _, _ = run_core(tiny_qwen3_path, prompts, GREEDY, arrivals=arrivals, enable_prefix_cache=False)
    paged, core, reqs = run_core(tiny_qwen3_path, prompts, GREEDY, arrivals=arrivals, page_size=page_size)
    assert paged == off
    assert core.stats()["hit_tokens"] > 0
    assert all(r.cached_tokens % page_size == 0 for r in reqs)


def test_eviction_and_retraction_keep_outputs(tiny_qwen3_path):
    """A pool too small for the batch: eviction and retraction happen, outputs do not change."""
    rng = random.Random(7)
    prompts = shared_prefix_prompts(rng, 10)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    big, _, _ = run_core(tiny_qwen3_path, prompts, params)
    small, core, _ = run_core(tiny_qwen3_path, prompts, params, kv_cache_tokens=90, max_prefill_tokens=16)
    assert small == big
    stats = core.stats()
    assert stats["retractions"] > 0
    assert stats["evicted_tokens"] > 0


def test_multi_turn_reuses_prompt_and_output(tiny_qwen3_path):
    """A finished request's prompt and output are cached: the next turn hits all of it."""
    config = EngineConfig(model=str(tiny_qwen3_path), device="cpu", check_invariants=True, show_progress=False)
    core = EngineCore(config, tiny_qwen3_path)
    first = list(range(10, 40))
    r1 = Req("turn1", first, GREEDY, seed=1)
    core.add([r1])
    while core.has_work():
        core.step()
    second = first + list(r1.output_ids) + [77, 78, 79]
    r2 = Req("turn2", second, GREEDY, seed=1)
    core.add([r2])
    while core.has_work():
        core.step()
    # Everything with K/V was inserted: the prompt and all output tokens but the last.
    assert r2.cached_tokens == len(first) + len(r1.output_ids) - 1
    (alone,), _, _ = run_core(tiny_qwen3_path, [second], GREEDY, enable_prefix_cache=False)
    assert list(r2.output_ids) == alone
    core.check_invariants()


def test_long_lived_token_state_is_one_object_to_the_collector(tiny_qwen3_path):
    """A full collection visits every item of a list; a request's token and slot ids, the
    tree's slot pieces and the free list are arrays (no items to visit), so what a pass walks
    does not grow with the tokens live requests hold."""
    config = EngineConfig(
        model=str(tiny_qwen3_path), device="cpu", check_invariants=True, show_progress=False,
        max_prefill_tokens=64,
    )
    core = EngineCore(config, tiny_qwen3_path)
    stem = list(range(10, 110))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [Req(f"r{i}", stem + [200 + i] * 20, params, seed=i) for i in range(4)]
    core.add(reqs)
    held = []
    while core.has_work():
        core.step()
        running = [r for r in reqs if r.kv_len]
        held += [obj for r in running for obj in (r.fill_ids, r.output_ids, r.slots)]
        held.append(core.runner.allocator._free)
    held += [node.value for node in _tree_nodes(core.tree)]
    assert len(held) > 20 and any(len(obj) >= 100 for obj in held)
    for obj in held:
        assert len(gc.get_referents(obj)) <= 1, type(obj)  # an array refers to its type at most
    core.check_invariants()


def _tree_nodes(tree):
    stack = list(tree._roots.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.key:
            yield node


def lpm_admission_order(path, aging: int) -> list[str]:
    """A cache miss waits while a stream of newer cache hits keeps arriving."""
    config = EngineConfig(
        model=str(path), device="cpu", check_invariants=True, show_progress=False,
        schedule_policy="lpm", max_running_requests=1, lpm_aging_tokens_per_step=aging,
    )
    core = EngineCore(config, path)
    stem = list(range(100, 140))
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    warm = Req("warm", stem + [1], short, seed=1)
    core.add([warm])
    while core.has_work():
        core.step()
    core.add([Req("miss", list(range(300, 310)), short, seed=1)])
    order: list[str] = []
    for step in range(200):
        if step < 30:
            core.add([Req(f"hit{step}", stem + [step + 2], short, seed=1)])
        if not core.has_work():
            break
        core.step()
        order += [r.rid for r in core.scheduler.running if r.rid not in order]
    return order


def test_lpm_prefers_cached_prefix_and_ages(tiny_qwen3_path):
    """LPM admits cache hits before a miss, and aging keeps the miss from starving."""
    no_aging = lpm_admission_order(tiny_qwen3_path, aging=0)
    aging = lpm_admission_order(tiny_qwen3_path, aging=10)
    assert no_aging[0].startswith("hit")  # the cached prefix goes first
    assert no_aging[-1] == "miss"  # without aging the miss waits for every hit
    assert aging.index("miss") < len(aging) // 2  # with aging it overtakes newer hits


def test_n_siblings_share_the_prompt(tiny_qwen3_path):
    """n > 1: the later completions are served from the first one's cached prompt."""
    from radixserve import Engine

    with Engine(str(tiny_qwen3_path), device="cpu", check_invariants=True) as engine:
        prompt = list(range(50, 90))
        out = engine.generate([prompt], SamplingParams(n=3, max_tokens=5, temperature=0.8, seed=3), progress=False)[0]
        assert len(out.outputs) == 3
        assert all(len(o.token_ids) == 5 for o in out.outputs)
        assert engine.stats()["hit_tokens"] >= 2 * (len(prompt) - 1)
        # Different seeds per completion: the completions are not all identical.
        assert len({tuple(o.token_ids) for o in out.outputs}) > 1


@pytest.mark.parametrize("enable_prefix_cache", [True, False])
def test_batch_order_puts_shared_prefixes_side_by_side(tiny_qwen3_path, enable_prefix_cache):
    """Two groups arriving interleaved: with batch_order "prefix" each group's decodes sit
    together (their shared K/V is read once into L2), with "arrival" they stay interleaved;
    the tokens are the same either way."""
    rng = random.Random(7)
    stems = [[rng.randrange(1, 500) for _ in range(40)] for _ in range(2)]
    prompts = [stems[i % 2] + [rng.randrange(1, 500) for _ in range(5)] for i in range(8)]
    seen_orders = {}
    outputs = {}
    for order in ("prefix", "arrival"):
        config = EngineConfig(model=str(tiny_qwen3_path), device="cpu", check_invariants=True, show_progress=False,
                              batch_order=order, enable_prefix_cache=enable_prefix_cache)
        core = EngineCore(config, tiny_qwen3_path)
        reqs = [Req(f"r{i}", p, GREEDY, seed=i) for i, p in enumerate(prompts)]
        core.add(reqs)
        core.step()  # one prefill step: folded (cache off) or cached after the first group member
        while core.has_work():
            core.step()
            if len(core.scheduler.running) == 8:
                seen_orders[order] = [int(r.rid[1:]) % 2 for r in core.scheduler.running]
        outputs[order] = [list(r.output_ids) for r in reqs]
        assert core.flush_cache() and core.runner.allocator.num_free == core.kv_capacity
    assert seen_orders["arrival"] == [0, 1] * 4
    assert seen_orders["prefix"] in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)
    assert outputs["prefix"] == outputs["arrival"]


def test_batch_order_is_checked():
    with pytest.raises(ValueError, match="batch_order"):
        EngineConfig(batch_order="random")


def test_lpm_groups_a_long_queue_by_prompt_start():
    """Past LPM_MAX_WAITING waiting requests, LPM orders by prompt start (no tree walks):
    groups in the order of their first arrival, arrival order inside a group, namespaces apart."""
    from types import SimpleNamespace

    from radixserve.scheduler.policy import LPM_MAX_WAITING, PREFIX_KEY_TOKENS, order_waiting

    stems = {name: [ord(name)] * PREFIX_KEY_TOKENS for name in "abc"}
    names = ["b", "a", "b", "c", "a", "c", "b"] * (LPM_MAX_WAITING // 7 + 1)
    waiting = [
        SimpleNamespace(rid=f"{n}{i}", fill_ids=stems[n] + [i], namespace="x" if n == "c" and i % 2 else None)
        for i, n in enumerate(names)
    ]
    order = order_waiting(waiting, "lpm", tree=object(), step=0, aging_tokens_per_step=16)
    assert sorted(order, key=id) == sorted(waiting, key=id)
    groups = [(r.fill_ids[0], r.namespace) for r in order]
    firsts = list(dict.fromkeys(groups))
    assert firsts == [(ord("b"), None), (ord("a"), None), (ord("c"), "x"), (ord("c"), None)]
    assert groups == sorted(groups, key=firsts.index)  # each group contiguous
    for key in firsts:
        members = [int(r.rid[1:]) for r in order if (r.fill_ids[0], r.namespace) == key]
        assert members == sorted(members)


def test_admission_counts_a_prompt_once_against_the_pool(tiny_qwen3_path):
    """Four 40-token prompts with one output token each fit a 200-slot pool together
    (4 x (40 + 0.7) reserved): all are admitted in the first step, not just two."""
    config = EngineConfig(model=str(tiny_qwen3_path), device="cpu", kv_cache_tokens=200, show_progress=False)
    core = EngineCore(config, tiny_qwen3_path)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    core.add([Req(f"r{i}", [i + 1] + list(range(100, 139)), params, seed=i) for i in range(4)])
    batch = core.scheduler.schedule()
    assert len(batch.reqs) == 4
    assert not core.scheduler.waiting


def _shared_slots(a: Req, b: Req) -> int:
    n = 0
    for x, y in zip(a.slots, b.slots):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("fold_mode", ["off", "mlp", "tree"])
def test_cache_off_shares_slots_only_within_a_fold(tiny_qwen3_path, fold_mode):
    """With the prefix cache off a request never points at another request's K/V, even a
    concurrent duplicate's after its commit; only tree folding shares, among the sequences
    folded together in one batch. With the cache on the later duplicate is served from the
    tree. Tokens are the same in every case."""
    prompt = list(range(100, 160))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = {}
    for cache in (True, False):
        config = EngineConfig(model=str(tiny_qwen3_path), device="cpu", check_invariants=True, show_progress=False,
                              enable_prefix_cache=cache, fold_mode=fold_mode)
        core = EngineCore(config, tiny_qwen3_path)
        first = [Req("a0", prompt + [1], params, seed=1), Req("a1", prompt + [2], params, seed=1)]
        core.add(first)
        core.step()  # both prefilled in one batch
        late = Req("b", prompt + [3], params, seed=1)
        core.add([late])
        core.step()  # the late one is prefilled while the first two decode
        core.step()
        folded = _shared_slots(first[0], first[1])
        borrowed = max(_shared_slots(first[0], late), _shared_slots(first[1], late))
        if cache:
            assert late.cached_tokens == len(prompt)
            assert borrowed >= len(prompt)
        else:
            assert late.cached_tokens == 0
            assert borrowed == 0
            assert folded == (len(prompt) if fold_mode == "tree" else 0)
        while core.has_work():
            core.step()
        outputs[cache] = [list(r.output_ids) for r in (*first, late)]
        core.check_invariants()
        assert core.flush_cache() and core.runner.allocator.num_free == core.kv_capacity
    assert outputs[True] == outputs[False]
