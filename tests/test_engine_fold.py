"""Within-batch folding: every fold mode gives the outputs of `off` (fp32: logprobs within
1e-4, greedy tokens identical), with the cache on and off, in every sharing case; and the
prefill-only APIs (embed, score) agree with transformers."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve import SamplingParams

MODES = ("off", "mlp", "tree")


def stem(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 500) for _ in range(n)]


def fold_cases() -> dict[str, tuple[list[list[int]], list[SamplingParams] | SamplingParams, dict]]:
    rng = random.Random(5)
    s = stem(rng, 20)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    return {
        "contained": ([s + stem(rng, 8), s[:12], s + stem(rng, 3)], greedy, {}),
        "identical": ([s, list(s), list(s)], greedy, {}),
        "chunk_cuts_shared_prefix": ([s[:12], s[:12] + [7], s + stem(rng, 20)], greedy, {"max_prefill_tokens": 31}),
        "params_differ": (
            [s + [1], s + [2], s + [3]],
            [
                greedy,
                SamplingParams(max_tokens=4, temperature=0.9, seed=3, logprobs=0),
                greedy.replace(repetition_penalty=1.3),
            ],
            {},
        ),
    }


def run(engine, prompts, params):
    outs = engine.generate(prompts, params, progress=False)
    return outs, [[o.token_ids for o in out.outputs] for out in outs]


def logprobs(outs) -> torch.Tensor:
    return torch.tensor([lp.logprob for out in outs for o in out.outputs for lp in o.logprobs])


@pytest.mark.parametrize("case", list(fold_cases()))
@pytest.mark.parametrize("model, cache", [("tiny", True), ("tiny", False), ("smollm", True)])
def test_fold_modes_equal_off(make_engine, request, case, model, cache):
    path = request.getfixturevalue("tiny_qwen3_path" if model == "tiny" else "smollm_path")
    prompts, params, options = fold_cases()[case]
    results = {}
    for mode in MODES:
        engine = make_engine(path, fold_mode=mode, enable_prefix_cache=cache, fold_threshold=1.0, **options)
        outs, tokens = run(engine, prompts, params)
        results[mode] = (outs, tokens, engine.stats())
    ref_outs, ref_tokens, _ = results["off"]
    for mode in ("mlp", "tree"):
        outs, tokens, stats = results[mode]
        assert tokens == ref_tokens, mode
        assert (logprobs(outs) - logprobs(ref_outs)).abs().max().item() < 1e-4
        assert stats["folded_tokens"] > 0, f"{mode} folded nothing in case {case}"
        assert sum(o.folded_tokens for o in outs) == stats["folded_tokens"]


def test_cache_hit_then_shared_uncached_tokens(make_engine, tiny_qwen3_path):
    """Two requests hit the same cached prefix, then share more tokens the cache lacks."""
    rng = random.Random(9)
    cached = stem(rng, 15)
    shared = stem(rng, 10)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [cached + shared + [1, 2], cached + shared + [3]]
    results = {}
    for mode in MODES:
        engine = make_engine(tiny_qwen3_path, fold_mode=mode, fold_threshold=1.0)
        engine.generate([cached + [4]], params, progress=False)  # warm the cache
        outs, tokens = run(engine, prompts, params)
        assert all(o.cached_tokens == len(cached) for o in outs)
        results[mode] = (outs, tokens)
        if mode != "off":
            assert outs[1].folded_tokens == len(shared)
    for mode in ("mlp", "tree"):
        assert results[mode][1] == results["off"][1]
        assert (logprobs(results[mode][0]) - logprobs(results["off"][0])).abs().max().item() < 1e-4


def test_n_siblings_fold_or_hit(make_engine, tiny_qwen3_path):
    params = SamplingParams(n=3, max_tokens=5, temperature=0.7, seed=11, logprobs=0)
    prompts = [list(range(20, 45)), list(range(20, 40)) + [9]]
    results = {}
    for mode in MODES:
        for cache in (True, False):
            engine = make_engine(tiny_qwen3_path, fold_mode=mode, enable_prefix_cache=cache, fold_threshold=1.0)
            results[(mode, cache)] = run(engine, prompts, params)[1]
    assert all(v == results[("off", True)] for v in results.values())


def test_fold_threshold_skips_batches_with_little_sharing(make_engine, tiny_qwen3_path):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14, 15]]  # 1 of 16 tokens shared
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    low = make_engine(tiny_qwen3_path, fold_threshold=0.9)
    run(low, prompts, params)
    assert low.stats()["folded_tokens"] == 0
    high = make_engine(tiny_qwen3_path, fold_threshold=1.0)
    run(high, prompts, params)
    assert high.stats()["folded_tokens"] == 1


def test_smollm_fold_modes_equal_off(make_engine, smollm_path):
    system = "You are a helpful assistant. Answer briefly and precisely. "
    prompts = [system + q for q in ("What is 2+2?", "Name a color.", "What is 2+2?")] + [system]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    results = {}
    for mode in MODES:
        engine = make_engine(smollm_path, fold_mode=mode, fold_threshold=1.0, max_running_requests=8)
        results[mode] = run(engine, prompts, params)
    for mode in ("mlp", "tree"):
        assert results[mode][1] == results["off"][1]
        assert (logprobs(results[mode][0]) - logprobs(results["off"][0])).abs().max().item() < 1e-4


# -- prefill-only APIs against transformers -------------------------------------------------


@pytest.fixture(scope="module")
def hf_tiny(tiny_qwen3_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32).eval()


def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
@pytest.mark.parametrize("mode", MODES)
def test_embed_matches_transformers(make_engine, tiny_qwen3_path, hf_tiny, pooling, mode):
    rng = random.Random(3)
    s = stem(rng, 12)
    inputs = [s + [5, 6], s, s + [7], stem(rng, 9)]
    engine = make_engine(tiny_qwen3_path, fold_mode=mode, fold_threshold=1.0)
    engine.generate([s + [1]], SamplingParams(max_tokens=1), progress=False)  # a cached prefix
    got = torch.tensor(engine.embed(inputs, pooling=pooling))
    for ids, vec in zip(inputs, got):
        h = hf_hidden(hf_tiny, ids)
        ref = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[pooling]
        ref = ref / ref.norm()
        assert (vec - ref).abs().max().item() < 1e-4
        assert abs(vec.norm().item() - 1.0) < 1e-5
    raw = engine.embed(inputs[:1], pooling="last", normalize=False)[0]
    assert (torch.tensor(raw) - hf_hidden(hf_tiny, inputs[0])[-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_score_matches_transformers(make_engine, tiny_qwen3_path, hf_tiny, mode):
    rng = random.Random(4)
    prompt = stem(rng, 16)
    completions = [stem(rng, 5), stem(rng, 1), stem(rng, 9), stem(rng, 5)]
    completions[3][:2] = completions[0][:2]  # completions sharing their start fold too
    engine = make_engine(tiny_qwen3_path, fold_mode=mode, fold_threshold=1.0)
    got = engine.score(prompt, completions)
    for c, scores in zip(completions, got):
        with torch.no_grad():
            logits = hf_tiny(torch.tensor([prompt + c])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        ref = logp[torch.arange(len(prompt) - 1, len(prompt) + len(c) - 1), torch.tensor(c)]
        assert len(scores) == len(c)
        assert (torch.tensor(scores) - ref).abs().max().item() < 1e-4
    if mode != "off":
        assert engine.stats()["folded_tokens"] > 0


def test_embed_and_score_validation(tiny_engine):
    with pytest.raises(ValueError, match="pooling"):
        tiny_engine.embed([[1, 2]], pooling="max")
    with pytest.raises(ValueError, match="completions"):
        tiny_engine.score([1, 2], [])
    with pytest.raises(ValueError, match="completions\\[1\\]"):
        tiny_engine.score([1, 2], [[3], []])
    with pytest.raises(ValueError, match="prompt"):
        tiny_engine.embed([[]])
