"""The engine on the GPU: fp32 greedy parity with the CPU, and bf16 fast backends vs the reference."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.runner import make_runner

from radixserve import SamplingParams
from radixserve.model_runner.attention import available_backends
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

GPU = dict(device="cuda", kv_cache_tokens=4096)


def _prompts() -> list[list[int]]:
    """Varied lengths; the later ones extend earlier ones, so the second round hits the cache."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (3, 19, 64, 150)]
    return base + [base[1] + [7, 8, 9], base[3][:100] + [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("backend", ["auto", "fa4", "torch_varlen", "torch"])
def test_gpu_fp32_greedy_matches_cpu(tiny_qwen3_path, make_engine, backend):
    if backend not in ("auto", *available_backends("cuda")):
        pytest.skip(f"{backend} is not available here")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = _prompts()
    cpu = make_engine(tiny_qwen3_path, dtype="float32", max_running_requests=4)
    gpu = make_engine(tiny_qwen3_path, dtype="float32", max_running_requests=4, attention_backend=backend, **GPU)
    for round_ in (prompts[:4], prompts[4:], prompts):  # the later rounds reuse cached prefixes
        want = [o.token_ids for o in cpu.generate(round_, params, progress=False)]
        got = [o.token_ids for o in gpu.generate(round_, params, progress=False)]
        assert got == want
    assert gpu.stats()["hit_tokens"] > 0


def test_gpu_bf16_engine_logs_its_backend(tiny_qwen3_path, make_engine, caplog):
    """bf16 on the GPU picks the fastest available backend and says so; sampling runs end to end."""
    with caplog.at_level(logging.INFO, logger="radixserve.model_runner.attention"):
        engine = make_engine(tiny_qwen3_path, dtype="bfloat16", max_running_requests=8, **GPU)
    picked = available_backends("cuda")[0]
    assert f"attention backend: {picked}" in caplog.text
    params = SamplingParams(max_tokens=24, temperature=0.6, ignore_eos=True, seed=1)
    outs = engine.generate(_prompts(), params, progress=False)
    assert [len(o.token_ids) for o in outs] == [24] * len(outs)


def test_forcing_an_unavailable_backend_is_a_value_error(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="not available on cpu"):
        Engine(str(tiny_qwen3_path), device="cpu", attention_backend="fa4")
    with pytest.raises(ValueError, match="attention_backend must be"):
        Engine(str(tiny_qwen3_path), attention_backend="flashinfer", **GPU)


def _runner(path, backend: str, fused: bool | None = None) -> ModelRunner:
    return make_runner(path, max_running_requests=8, kv_cache_tokens=8192, gpu_memory_utilization=0.9,
                       attention_backend=backend, fused_kernels=fused)


def _three_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill half of each prompt, then the rest over that cached half, then one decode each."""
    g = torch.Generator().manual_seed(1)
    lens = [5, 40, 333, 700]
    prompts = [torch.randint(0, 500, (n,), generator=g) for n in lens]
    halves = [n // 2 for n in lens]
    rows = [3, 0, 6, 1]
    logits = []
    steps = [
        [(0, h) for h in halves],
        [(h, n - h) for h, n in zip(halves, lens)],
        [(n, 1) for n in lens],
    ]
    for step in steps:
        ids, pos, slots = [], [], []
        for row, prompt, (start, n) in zip(rows, prompts, step):
            new = torch.tensor(runner.allocator.alloc(n))
            runner.req_to_token.write(row, start, new)
            ids.append(prompt[start : start + n] if start < len(prompt) else torch.tensor([7]))
            pos.append(torch.arange(start, start + n))
            slots.append(new)
        ends = torch.tensor([n for _, n in step]).cumsum(0) - 1
        batch = ForwardBatch(
            input_ids=torch.cat(ids), positions=torch.cat(pos), out_slots=torch.cat(slots),
            req_rows=rows, prefix_lens=[s for s, _ in step], extend_lens=[n for _, n in step],
            logits_rows=ends,
        )
        out = runner.forward(batch)
        logits.append(getattr(out, "logits", out).cpu())  # ForwardOutput, or bare logits
    return logits


@pytest.mark.parametrize("backend", ["fa4", "torch_varlen"])
def test_bf16_runner_logits_match_reference_backend(qwen3_d64, backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    want = _three_steps(_runner(qwen3_d64, "torch"))
    got = _three_steps(_runner(qwen3_d64, backend))
    for step, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).norm() / b.norm())
        assert err < 2e-2, f"step {step}: logits relative error {err:.2e}"
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_fused_kernels_on_by_default_and_close_to_eager(qwen3_d64):
    """torch.compile'd norms/RoPE/SiLU (Triton on the GPU) against the eager math, bf16."""
    backend = "fa4" if "fa4" in available_backends("cuda") else "torch"
    fused = _runner(qwen3_d64, backend)
    assert fused.model.kernels.compiled
    eager = _runner(qwen3_d64, backend, fused=False)
    assert not eager.model.kernels.compiled
    for step, (a, b) in enumerate(zip(_three_steps(fused), _three_steps(eager))):
        err = float((a - b).norm() / b.norm())
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        print(f"fused vs eager, step {step}: relative error {err:.2e}, argmax agreement {agree:.2f}")
        assert err < 2e-2, f"step {step}: logits relative error {err:.2e}"
        assert agree >= 0.75, f"step {step}: argmax agreement {agree:.2f}"


def _fa4_variants() -> int:
    from flash_attn.cute import interface

    return len(interface._flash_attn_fwd.compile_cache.cache)


def test_a_variant_compiled_after_start_is_counted_and_logged(needs_fa4, qwen3_d64, make_engine, caplog):
    """A call that compiles an FA4 variant once the engine has started is counted in stats and
    logged as a warning with its shape (the engine never asks for non-causal attention without
    LSE: a variant of its own)."""
    engine = make_engine(qwen3_d64, dtype="bfloat16", attention_backend="fa4", **GPU)
    runner = engine.core.runner
    before = _fa4_variants()
    batch = ForwardBatch(
        input_ids=torch.empty(0, dtype=torch.int64), positions=torch.empty(0, dtype=torch.int64),
        out_slots=torch.empty(0, dtype=torch.int64), req_rows=[0, 1], prefix_lens=[16, 16], extend_lens=[8, 8],
        logits_rows=torch.empty(0, dtype=torch.int64),
    )
    runner.backend.prepare(batch, runner.req_to_token.table)
    cfg = runner.model_config
    q = torch.randn(16, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    with caplog.at_level(logging.WARNING, logger="radixserve.model_runner.attention.fa4_backend"):
        runner.backend._call(q, runner.pool.k[0], runner.pool.v[0], runner.scale, runner.backend._meta,
                             causal=False, return_lse=False)
    grew = _fa4_variants() - before
    assert engine.stats()["attention_compiles"] == grew
    if not grew:
        pytest.skip("an earlier test in this process compiled that variant already")
    assert "FA4 compiled a kernel variant" in caplog.text and "2 sequences, 16 query rows" in caplog.text


def test_engine_start_compiles_every_fa4_variant_serving_needs(needs_fa4, qwen3_d64, make_engine):
    """Prefill chunks, mixed steps and cascades of every size after start compile no FA4
    variant (a compile mid-run stalled a step for 4.5 s): the start warms them up."""
    engine = make_engine(
        qwen3_d64, dtype="bfloat16", attention_backend="fa4", max_running_requests=12,
        max_prefill_tokens=300, cascade_min_prefix=32, **GPU,
    )
    before = _fa4_variants()
    g = torch.Generator().manual_seed(3)
    stems = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (40, 400)]
    prompts = [stems[i % 2] + torch.randint(0, 500, (5 + 37 * i,), generator=g).tolist() for i in range(12)]
    params = SamplingParams(max_tokens=20, temperature=0.6, ignore_eos=True, seed=2)
    outs = engine.generate(prompts, params, progress=False)
    assert [len(o.token_ids) for o in outs] == [20] * len(prompts)
    assert engine.stats()["cascade_batches"] > 0
    # One short request alone (a fresh server's first request: it compiled for 5 s before).
    engine.generate([list(range(100, 116))], SamplingParams(max_tokens=2), progress=False)
    assert _fa4_variants() == before
    assert engine.stats()["attention_compiles"] == 0  # what the engine counts and would log
