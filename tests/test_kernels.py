"""The position-wise kernels (model_runner/models/kernels.py): compiled against eager.

torch.compile runs here on the CPU too (Inductor's C++ backend), so CI checks the
fused path's math; on the GPU the same functions become Triton kernels
(tests/test_gpu_engine.py checks those)."""

from __future__ import annotations

import pytest
import torch

from radixserve import SamplingParams
from radixserve.model_runner.models.kernels import EAGER, compiled_kernels


@pytest.fixture(scope="module")
def fused():
    return compiled_kernels()


@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_compiled_kernels_match_eager(fused, tokens):
    g = torch.Generator().manual_seed(tokens)
    heads, kv_heads, dim, hidden = 4, 2, 16, 48

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, residual, weight = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-6), EAGER.rms_norm(x, weight, 1e-6))
    for a, b in zip(fused.add_rms_norm(x, residual, weight, 1e-6), EAGER.add_rms_norm(x, residual, weight, 1e-6)):
        torch.testing.assert_close(a, b)
    # q and k as the decoder passes them: strided views into one fused qkv output.
    qkv = rand(tokens, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    cache, positions = rand(64, dim), torch.randint(0, 64, (tokens,), generator=g)
    qw, kw = rand(dim), rand(dim)
    for a, b in zip(fused.qk_norm_rope(q, k, qw, kw, 1e-6, cache, positions),
                    EAGER.qk_norm_rope(q, k, qw, kw, 1e-6, cache, positions)):
        torch.testing.assert_close(a, b)
        assert a.shape == b.shape and a.is_contiguous()
    for a, b in zip(fused.rope(q, k, cache, positions), EAGER.rope(q, k, cache, positions)):
        torch.testing.assert_close(a, b)
    gate_up = rand(tokens, 2 * hidden)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), EAGER.silu_and_mul(gate_up))


def test_engine_with_fused_kernels_matches_eager(tiny_qwen3_path, make_engine, fused):
    prompts = [[3, 14, 15, 92, 65], [2, 71, 82, 81, 82, 84, 59], [3, 14, 15, 92, 65, 35, 89]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    eager = make_engine(tiny_qwen3_path, fused_kernels=False)
    compiled = make_engine(tiny_qwen3_path, fused_kernels=True)
    assert compiled.core.runner.model.kernels.compiled and not eager.core.runner.model.kernels.compiled
    want = eager.generate(prompts, params, progress=False)
    got = compiled.generate(prompts, params, progress=False)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert len(a.logprobs) == len(b.logprobs) == 6
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert abs(lp_a.logprob - lp_b.logprob) < 1e-4


def test_fused_kernels_option_is_checked(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="fused_kernels"):
        Engine(str(tiny_qwen3_path), device="cpu", fused_kernels="yes", show_progress=False)


def test_many_model_shapes_share_the_compiled_kernels(fused):
    """Engines of several shapes share the compiled functions, and each shape may add a
    graph: on the H100, engines of a few test models in one process passed dynamo's default
    of 8 graphs per function (a hard error with fullgraph). The limit is raised when the
    kernels are made; every shape still matches eager."""
    assert torch._dynamo.config.recompile_limit >= 64
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim in [(2, 1, 8), (4, 2, 8), (4, 1, 16), (8, 2, 16), (6, 3, 32), (8, 8, 32),
                                 (4, 4, 64), (16, 8, 64), (8, 1, 128), (16, 2, 128)]:
        for tokens in (1, 3):
            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
            q = qkv[:, : heads * dim].view(tokens, heads, dim)
            k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
            cache, positions = torch.randn(16, dim, generator=g), torch.randint(0, 16, (tokens,), generator=g)
            w = torch.ones(dim)
            for a, b in zip(fused.qk_norm_rope(q, k, w, w, 1e-6, cache, positions),
                            EAGER.qk_norm_rope(q, k, w, w, 1e-6, cache, positions)):
                torch.testing.assert_close(a, b)


def transformers_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's steps (float32 variance, cast back, then the weight)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 32, 300, 2048])
def test_float32_cpu_rms_norm_is_bitwise_the_step_by_step_one(rows):
    """The fused float32 path (torch's rms_norm) gives transformers' bits: hidden rows, and q/k
    heads as the decoder hands them (strided views into the qkv output)."""
    g = torch.Generator().manual_seed(rows)
    for scale in (1e-3, 1.0, 40.0):
        x, weight = torch.randn(rows, 576, generator=g) * scale, torch.rand(576, generator=g) + 0.5
        assert torch.equal(EAGER.rms_norm(x, weight, 1e-5), transformers_rms_norm(x, weight, 1e-5))
        qkv = torch.randn(rows, (9 + 2 * 3) * 64, generator=g) * scale
        q = qkv[:, : 9 * 64].view(rows, 9, 64)
        k = qkv[:, 9 * 64 : 12 * 64].view(rows, 3, 64)
        head_weight = torch.rand(64, generator=g) + 0.5
        for heads in (q, k):
            want = transformers_rms_norm(heads, head_weight, 1e-6)
            assert torch.equal(EAGER.rms_norm(heads, head_weight, 1e-6), want)


def test_silu_and_mul_is_bitwise_silu_times_up():
    gate_up = torch.randn(300, 2 * 96, generator=torch.Generator().manual_seed(0))
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    before = gate_up.clone()
    assert torch.equal(EAGER.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)
    assert torch.equal(gate_up, before)  # the input is left as it was
