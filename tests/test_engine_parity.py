"""The engine against transformers (same weights, fp32, CPU): greedy tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from radixserve import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
]


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm_path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tiny(tiny_qwen3_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: with pad_token_id set, a token 0 would be masked
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def hf_logprobs(model, ids: list[int], completion: list[int]) -> torch.Tensor:
    """Log-probabilities transformers gives each completion token (teacher forcing)."""
    full = torch.tensor([ids + completion])
    with torch.no_grad():
        logits = model(full).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(ids) - 1, len(ids) + len(completion) - 1)
    return logp[rows, torch.tensor(completion)]


def test_smollm_greedy_matches_transformers(smollm_engine, hf_smollm):
    """Several prompts in one batch: token-identical greedy continuations."""
    tok = smollm_engine.tokenizer
    n = 24
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = smollm_engine.generate(PROMPTS, params, progress=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_greedy(hf_smollm, ids, n), prompt
        assert out.finish_reason == "length"


def test_smollm_chat_greedy_matches_transformers(smollm_engine, hf_smollm):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = smollm_engine.apply_chat_template(messages)
    out = smollm_engine.chat(messages, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert out.token_ids == hf_greedy(hf_smollm, ids, 16)
    assert out.text == smollm_engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_tiny_qwen3_logprobs_match_transformers(tiny_engine, hf_tiny):
    """Raw logprobs along the generated path equal transformers' within 1e-4 (fp32)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 17, 40)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    outs = tiny_engine.generate(prompts, params, progress=False)
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_tiny, ids, 12)
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        ref = hf_logprobs(hf_tiny, ids, out.token_ids)
        assert (ours - ref).abs().max().item() < 1e-4
        for lp in out.logprobs:
            assert len(lp.top) == 3
            assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
            assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_tiny_qwen3_chunked_prefill_logprobs(make_engine, tiny_qwen3_path, hf_tiny):
    """A prompt computed in 7-token chunks gives the same logprobs as transformers."""
    engine = make_engine(tiny_qwen3_path, max_prefill_tokens=7)
    ids = torch.randint(0, 500, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    out = engine.generate([ids], params, progress=False)[0]
    ref = hf_logprobs(hf_tiny, ids, out.token_ids)
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    assert out.token_ids == hf_greedy(hf_tiny, ids, 6)
    assert (ours - ref).abs().max().item() < 1e-4
