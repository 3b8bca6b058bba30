"""Routing policies and prompt keys (no server): the longest match wins, the balance thresholds
override it, the approximate trees stay within their bound, and prompts become keys that keep
the prefix relation."""

from __future__ import annotations

import random

import pytest

from radixserve.router.keys import IDS, TEXT, answer_text, answered_key, request_key, text_key
from radixserve.router.policy import ApproxTree, CacheAware, LeastLoad, PromptKey, RoundRobin, make_policy

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def key(*ids: int) -> PromptKey:
    return PromptKey(None, list(ids))


def cache_aware(**kw) -> CacheAware:
    policy = CacheAware(kw.pop("cache_tokens", 10_000), **kw)
    for r in (A, B, C):
        policy.add(r)
    return policy


def idle() -> dict[str, int]:
    return {A: 0, B: 0, C: 0}


def test_longest_match_wins():
    policy = cache_aware()
    long = list(range(100, 200))
    first = policy.choose(key(*long), idle())
    assert first.reason == "low_match" and first.matched == 0
    # A different prompt goes elsewhere (least loaded, then least cached: the empty trees).
    other = policy.choose(key(*range(500, 600)), idle())
    assert other.replica != first.replica
    for suffix in range(5):
        again = policy.choose(key(*long, 1000 + suffix), idle())
        assert (again.replica, again.reason, again.matched, again.key_len) == (first.replica, "cache_match", 100, 101)
    # The replica holding the longer prefix wins over one holding a shorter one.
    policy.trees[other.replica].insert(key(*long[:60]))
    assert policy.choose(key(*long, 7), idle()).replica == first.replica


def test_match_ties_go_to_the_less_loaded():
    policy = cache_aware()
    for r in (A, B):
        policy.trees[r].insert(key(1, 2, 3, 4))
    choice = policy.choose(key(1, 2, 3, 4, 5), {A: 3, B: 1, C: 0})
    assert (choice.replica, choice.reason) == (B, "cache_match")


def test_below_the_threshold_the_least_loaded_wins():
    policy = cache_aware(cache_threshold=0.5)
    policy.trees[A].insert(key(*range(10)))
    policy.trees[A].insert(key(*range(100, 110)))
    # 10 of 30 elements matched (33% < 50%): not enough to pull the request to A.
    choice = policy.choose(key(*range(30)), {A: 2, B: 1, C: 1})
    assert choice.reason == "low_match" and choice.replica in (B, C) and choice.matched == 0
    # 10 of 15 (67%) is.
    choice = policy.choose(key(*range(100, 110), 77, 78, 79, 80, 81), {A: 2, B: 1, C: 1})
    assert (choice.replica, choice.reason, choice.matched) == (A, "cache_match", 10)


def test_imbalance_overrides_the_cache():
    policy = cache_aware(balance_abs=4, balance_rel=1.5)
    policy.trees[A].insert(key(*range(50)))
    probe = key(*range(50), 99)
    # max - min = 5 > 4 but 10 <= 1.5 x 7: balanced, the cache wins.
    assert policy.choose(probe, {A: 10, B: 7, C: 8}).replica == A
    # max - min = 4, not above the absolute threshold: balanced.
    assert policy.choose(probe, {A: 6, B: 2, C: 3}).replica == A
    # max - min = 5 > 4 and 11 > 1.5 x 6: imbalanced, the least loaded wins.
    choice = policy.choose(probe, {A: 11, B: 6, C: 9})
    assert (choice.replica, choice.reason) == (B, "imbalance")
    # The imbalanced choice records the prompt at its replica.
    assert policy.trees[B].match(probe).length == 51


def test_approx_tree_stays_within_its_bound_lru():
    tree = ApproxTree(100)
    rng = random.Random(0)
    for i in range(200):
        tree.insert(key(i, *(rng.randrange(50) for _ in range(rng.randrange(1, 40)))))
        assert tree.size <= 100
        tree.tree.check()
    hot = key(7, 7, 7, 7, 7, 7, 7, 7, 7, 7)
    tree.insert(hot)
    for i in range(30):
        tree.insert(key(10_000 + i, 1, 2))  # 3 elements each: 90 in all, so the oldest must go
        tree.match(hot)  # used: stays
    assert tree.match(hot).length == 10
    assert tree.size <= 100
    # A key longer than the bound is kept cut to the bound, evicting everything else.
    tree.insert(key(*range(500, 650)))
    assert tree.size == 100 and tree.match(key(*range(500, 650))).length == 100


def test_a_failed_replica_forgets_its_cache():
    policy = cache_aware()
    first = policy.choose(key(*range(40)), idle())
    assert policy.cached_tokens(first.replica) == 40
    policy.forget(first.replica)
    assert policy.cached_tokens(first.replica) == 0
    policy.remove(first.replica)
    assert policy.choose(key(*range(40)), {r: 0 for r in (A, B, C) if r != first.replica}).replica != first.replica


def test_round_robin_and_least_load():
    rr = RoundRobin()
    for r in (A, B, C):
        rr.add(r)
    assert [rr.choose(None, idle()).replica for _ in range(6)] == [A, B, C, A, B, C]
    assert [rr.choose(None, {A: 0, C: 0}).replica for _ in range(2)] == [A, C]  # B out of the rotation
    ll = LeastLoad()
    for r in (A, B, C):
        ll.add(r)
    assert ll.choose(None, {A: 3, B: 1, C: 2}).replica == B
    assert {ll.choose(None, idle()).replica for _ in range(3)} == {A, B, C}  # ties taken in turn


@pytest.mark.parametrize("bad", [{"cache_tokens": 0}, {"cache_threshold": 1.5}, {"balance_abs": -1},
                                 {"balance_rel": 0.5}])
def test_bad_settings_are_refused(bad):
    kw = {"cache_tokens": 100, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_policy("cache_aware", **kw)
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("random")


def test_text_keys_keep_the_prefix_relation():
    assert text_key("abcdefghi").ids == text_key("abcdef").ids + text_key("ghi").ids
    assert text_key("abcdefgh").ids == text_key("abcdef").ids  # a partial last element is left out
    assert len(text_key("ab").ids) == 0 and len(text_key("abc").ids) == 1
    assert text_key("héllo wörld 日本語").ids != text_key("hello world 日本語").ids
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    k1, k2 = request_key("chat", {"messages": turn1}), request_key("chat", {"messages": turn2})
    assert k1.namespace == TEXT and k2.ids[: len(k1.ids)] == k1.ids and len(k2.ids) > len(k1.ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    assert request_key("chat", {"messages": parts}) == request_key("chat", {"messages": turn1[1:]})


def test_request_keys_of_every_route():
    assert request_key("completions", {"prompt": "hello world"}) == text_key("hello world")
    assert request_key("completions", {"prompt": [1, 2, 3]}) == PromptKey(IDS, [1, 2, 3])
    assert request_key("completions", {"prompt": [[4, 5], [6]]}) == PromptKey(IDS, [4, 5])
    assert request_key("completions", {"prompt": ["first one", "second"]}) == text_key("first one")
    assert request_key("generate", {"text": "hello world"}) == text_key("hello world")
    assert request_key("generate", {"input_ids": [9, 8]}) == PromptKey(IDS, [9, 8])
    assert request_key("embeddings", {"input": "query: x"}) == text_key("query: x")
    for route, body in [("chat", {"messages": "no"}), ("chat", {"messages": [1]}), ("completions", {"prompt": 5}),
                        ("completions", []), ("generate", {}), ("tokenize", {"prompt": "x"}),
                        ("completions", {"prompt": [True, False]}), ("completions", {"prompt": [2**70]}),
                        ("completions", {"prompt": [[[1]]]}), ("generate", {"input_ids": [1.5]}),
                        ("embeddings", {"input": []})]:
        assert request_key(route, body) is None, (route, body)


def test_an_answer_extends_the_key_as_the_next_turn_will():
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    reply = "Hello! How can I help you today?"
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me more."}]
    answered = answered_key("chat", {"messages": turn1}, reply)
    nxt = request_key("chat", {"messages": turn2})
    assert nxt.ids[: len(answered.ids)] == answered.ids
    assert len(answered.ids) > len(request_key("chat", {"messages": turn1}).ids)
    completion = answered_key("completions", {"prompt": "Once upon"}, " a time")
    assert completion == text_key("Once upon a time")
    for route, body in [("completions", {"prompt": ["a", "b"]}), ("completions", {"prompt": "a", "echo": True}),
                        ("chat", {"messages": turn1, "continue_final_message": True}), ("generate", {"text": "x"})]:
        assert answered_key(route, body, "more text") is None
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}]}
    chunk = {"choices": [{"index": 0, "delta": {"content": "Par"}}]}
    assert answer_text("chat", whole, stream=False) == "Paris." and answer_text("chat", chunk, stream=True) == "Par"
    assert answer_text("completions", {"choices": [{"index": 0, "text": " is"}]}, stream=True) == " is"
    for bad in [{"choices": [{"index": 1, "text": "x"}]}, {"choices": []}, {"error": {}}, [], {"choices": [5]}]:
        assert answer_text("completions", bad, stream=True) is None
