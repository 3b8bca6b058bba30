"""Prompt logprobs on the GPU (overlap, graphs and the fast backends on by default): fp32 against
the CPU engine, and bf16 close to it, with the cache warm and chunks of the prompt per step."""

from __future__ import annotations

import pytest
import torch

from radixserve import SamplingParams

pytestmark = pytest.mark.gpu

GPU = dict(device="cuda", kv_cache_tokens=4096)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    base = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 40, 130)]
    return base + [base[2][:90] + [3, 4, 5]]


def _values(out) -> torch.Tensor:
    return torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_gpu_prompt_logprobs_match_cpu(tiny_qwen3_path, make_engine, dtype, tol):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    cpu = make_engine(tiny_qwen3_path, dtype="float32", max_running_requests=4)
    gpu = make_engine(tiny_qwen3_path, dtype=dtype, max_running_requests=4, max_prefill_tokens=64, **GPU)
    prompts = _prompts()
    want = cpu.generate(prompts, params, progress=False)
    for _ in range(2):  # the second round finds every prompt cached
        got = gpu.generate(prompts, params, progress=False)
        for g, w in zip(got, want):
            assert [e.token_id for e in g.prompt_logprobs[1:]] == [e.token_id for e in w.prompt_logprobs[1:]]
            assert (_values(g) - _values(w)).abs().max().item() < tol
            assert all(len(e.top) == 2 for e in g.prompt_logprobs[1:])
    zero = gpu.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0), progress=False)
    assert all(o.token_ids == [] and o.finish_reason == "length" for o in zero)
