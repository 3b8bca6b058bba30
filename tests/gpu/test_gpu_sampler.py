"""The batched sampler on CUDA: no host sync in building a batch, sampling, or stepping it;
draws that match the CPU's and the pure-torch path's (rows and parameter sets from
tests/test_sampler.py)."""

from __future__ import annotations

import pytest
import torch
from test_sampler import MOVABLE, PARAMS, row, run

from radixserve.model_runner import sampler
from radixserve.model_runner.sampler import SamplingBatch, sample


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_and_sample_never_sync_and_match_cpu():
    torch.manual_seed(4)
    logits = torch.randn(8, 1000) * 2
    rows = [row(PARAMS[i % len(PARAMS)], seed=i, step=i, history=[1, 2], output=[2], suppress=[3]) for i in range(8)]
    cpu = run(logits, rows)
    gpu_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(rows, 1000, "cuda")
        out = sample(gpu_logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = SamplingBatch.build(rows, 1000, "cpu")
    assert torch.equal(batch.seed_keys.cpu(), on_cpu.seed_keys) and torch.equal(batch.steps.cpu(), on_cpu.steps)
    assert torch.equal(out.token_ids.cpu(), cpu.token_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_reproduce_in_any_batch_and_match_the_torch_path(monkeypatch):
    torch.manual_seed(6)
    logits = torch.randn(300, 50_000, device="cuda") * 3
    rows = [row(PARAMS[i % len(PARAMS)], seed=1000 + i, step=i % 7) for i in range(300)]
    together = run(logits, rows).token_ids
    alone = torch.cat([run(logits[i : i + 1], [r]).token_ids for i, r in enumerate(rows[:20])])
    assert torch.equal(together[:20], alone)
    reverse = run(logits.flip(0), rows[::-1]).token_ids
    assert torch.equal(reverse.flip(0), together)
    monkeypatch.setattr(sampler, "triton", None)  # the pure-torch path, same formula
    assert torch.equal(run(logits, rows).token_ids, together)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_next_step_never_syncs_and_draws_what_a_build_draws(monkeypatch):
    torch.manual_seed(7)
    logits = torch.randn(64, 50_000, device="cuda") * 3
    rows = [row(MOVABLE[i % len(MOVABLE)], seed=500 + i, step=i % 5 + (2**32 - 2 if i == 7 else 0)) for i in range(64)]
    batch = SamplingBatch.build(rows, 50_000, "cuda")
    drawn = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch = batch.next_step()
            drawn.append(sample(logits, batch).token_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(sampler, "triton", None)  # the pure-torch path, from freshly built batches
    for k, tokens in enumerate(drawn, start=1):
        fresh = SamplingBatch.build([r._replace(step=r.step + k) for r in rows], 50_000, "cuda")
        assert torch.equal(tokens, sample(logits, fresh).token_ids)
