"""Split-KV paged decode in Triton on the GPU: bf16 at model sizes, a pool past int32
element offsets, and inside a CUDA graph (the CPU cases, under Triton's interpreter,
are in tests/test_triton_decode.py, whose torch reference these share)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.triton_cases import gpu_case, random_lens, rel_err
from test_triton_decode import reference

from radixserve.model_runner.attention.triton_decode import (
    KernelConfig,
    choose_num_splits,
    make_workspace,
    paged_decode,
)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)], ids=["qwen3-0.6b", "qwen3-8b"])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_bf16_matches_reference(device, heads, batch):
    """Model shapes, lengths 1..2048, the split count the helper picks and a few others."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    q, k, v, table, seqused = gpu_case(random_lens(batch, 1, 2048, batch), *heads, seed=batch)
    scale = 1 / math.sqrt(128)
    ref_out, ref_lse = reference(q, k, v, table, seqused, scale)
    auto = choose_num_splits(batch, heads[1], torch.cuda.get_device_properties(0).multi_processor_count)
    for num_splits in sorted({auto, 1, 5}):
        for config in (KernelConfig(), KernelConfig(32, 4, 4), KernelConfig(128, 8, 2)):
            out, lse = paged_decode(q, k, v, table, seqused, scale, num_splits, return_lse=True, config=config)
            assert torch.isfinite(out).all(), (num_splits, config)
            assert rel_err(out, ref_out) < 1e-2, (num_splits, config)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_pool_past_int32_offsets(device):
    """Slots whose element offset slot * Hkv * D passes 2^31 (a 2.2M-slot pool: 4.5 GB per
    K and V): the kernel's offset arithmetic is int64."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    num_slots = 2_200_000
    first = 2_000_000  # 2**31 / (8 * 128) = 2_097_152: about half the slots lie past it
    q, k, v, table, seqused = gpu_case(random_lens(16, 500, 3000, 7), 16, 8, seed=7,
                                        num_slots=num_slots, first_slot=first)
    assert int(table.max()) * 8 * 128 >= 2**31
    out = paged_decode(q, k, v, table, seqused, 0.09, num_splits=4)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, table, seqused, 0.09)[0]) < 1e-2


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(device):
    """Captured once, replayed with new lengths and slot lists in the same static buffers."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    batch, hq, hkv = 32, 32, 8
    q, k, v, _, _ = gpu_case(random_lens(batch, 1, 4096, 0), hq, hkv, seed=0)
    width = 8192  # a fixed table width covers every replay, as under the engine's graphs
    s_table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    s_used = torch.zeros(batch, dtype=torch.int32, device="cuda")
    s_q = torch.empty_like(q)
    num_splits = 8
    ws = make_workspace(batch, hq, 128, num_splits, "cuda")
    out = torch.empty_like(q)
    lse = None

    valid = torch.isfinite(k[:, 0, 0]).nonzero().flatten().to(torch.int32)

    def fill(seed):
        """New queries, lengths up to the width, slots drawn from the pool's valid ones;
        entries past each length are slot 0 (NaN)."""
        g = torch.Generator(device="cuda").manual_seed(seed)
        s_q.normal_(generator=g)
        s_used.copy_(torch.randint(1, width + 1, (batch,), generator=g, device="cuda"))
        picks = valid[torch.randint(0, len(valid), (batch, width), generator=g, device="cuda")]
        past = torch.arange(width, device="cuda") >= s_used[:, None]
        s_table.copy_(picks.masked_fill(past, 0))

    fill(1)
    paged_decode(s_q, k, v, s_table, s_used, 0.1, num_splits, out=out, workspace=ws, return_lse=True)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = paged_decode(s_q, k, v, s_table, s_used, 0.1, num_splits, out=out, workspace=ws, return_lse=True)
    for seed in (2, 3):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(s_q, k, v, s_table, s_used, 0.1)
        assert rel_err(out, ref_out) < 1e-2
        torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)
