"""Cascade's prefix pass in Triton on the GPU: bf16 at model sizes, a pool past int32
element offsets, and inside a CUDA graph with the groups padded as the engine's graphs pad
them, over bf16 and fp8 (float8_e4m3fn) caches (the CPU cases, under Triton's interpreter,
are in tests/test_triton_group.py, whose torch reference these share)."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch
from helpers.triton_cases import dequantize_fp8, gpu_case, random_lens, rel_err, to_fp8_case
from test_triton_group import reference

from radixserve.model_runner.attention.metadata import cumulative_lens
from radixserve.model_runner.attention.triton_decode import make_workspace
from radixserve.model_runner.attention.triton_group import (
    FP8_GROUP_CONFIG,
    GroupKernelConfig,
    choose_group_splits,
    paged_group_attend,
)


def gpu_group_case(rows, keys, hq, hkv, seed, **pool):
    """make_group_case on the GPU in bf16 (gpu_case's pool: NaN outside the groups' slots)."""
    _, k, v, table, seqused = gpu_case(keys, hq, hkv, seed=seed, **pool)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = torch.randn(sum(rows), hq, 128, generator=g, dtype=torch.bfloat16, device="cuda")
    cu = cumulative_lens(torch.tensor(rows, dtype=torch.int32, device="cuda"))
    return q, k, v, table, seqused, cu


GPU_CASES = {
    # the shared-prefix workload's decode step: 64 prompts of 2,048 tokens, 16 questions each
    "64x16-2048": ([16] * 64, [2048] * 64),
    "256x2..6-ragged": (random_lens(256, 2, 6, 1), random_lens(256, 1, 2048, 2)),
    "1x512-2048": ([512], [2048]),  # one group of many chunks
}


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)], ids=["qwen3-0.6b", "qwen3-8b"])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_bf16_matches_reference(device, case, heads):
    """Model shapes, the split count the rule picks and a few others, several tile configs."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    rows, keys = GPU_CASES[case]
    hq, hkv = heads
    q, k, v, table, seqused, cu = gpu_group_case(rows, keys, hq, hkv, seed=len(rows))
    scale = 1 / math.sqrt(128)
    ref_out, ref_lse = reference(q, k, v, table, seqused, cu, scale)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = choose_group_splits(len(q), len(rows), hq, hkv, sms)
    configs = (GroupKernelConfig(), GroupKernelConfig(32, 64, 4, 2), GroupKernelConfig(64, 32, 4, 3),
               GroupKernelConfig(128, 64, 8, 2))
    for num_splits in sorted({auto, 1, 5}):
        for config in configs:
            out, lse = paged_group_attend(q, k, v, table, seqused, cu, scale, num_splits, return_lse=True,
                                          config=config)
            assert torch.isfinite(out).all(), (num_splits, config)
            assert rel_err(out, ref_out) < 1e-2, (num_splits, config)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)], ids=["qwen3-0.6b", "qwen3-8b"])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_fp8_matches_reference(device, case, heads):
    """bf16 q over an fp8 cache (per-head scales, saturated keys): out and lse against the
    reference over the dequantized cache, at the split count the rule picks and others,
    with the fp8 config and the bf16 ones."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    rows, keys = GPU_CASES[case]
    hq, hkv = heads
    q, k, v, table, seqused, cu = gpu_group_case(rows, keys, hq, hkv, seed=len(rows) + 1, num_slots=1 << 19)
    k8, v8, k_scale, v_scale = to_fp8_case(k, v)
    del k, v
    scale = 1 / math.sqrt(128)
    ref_out, ref_lse = reference(q, dequantize_fp8(k8, k_scale), dequantize_fp8(v8, v_scale), table, seqused, cu,
                                 scale)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = choose_group_splits(len(q), len(rows), hq, hkv, sms, FP8_GROUP_CONFIG)
    for num_splits in sorted({auto, 1, 5}):
        for config in (FP8_GROUP_CONFIG, GroupKernelConfig(), GroupKernelConfig(64, 32, 4, 3),
                       GroupKernelConfig(128, 64, 8, 2)):
            out, lse = paged_group_attend(q, k8, v8, table, seqused, cu, scale, num_splits, return_lse=True,
                                          config=config, k_scale=k_scale, v_scale=v_scale)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), (num_splits, config)
            assert rel_err(out, ref_out) < 1e-2, (num_splits, config)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_pool_past_int32_offsets(device):
    """Slots whose element offset slot * Hkv * D passes 2^31: the offsets are int64."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    rows, keys = random_lens(16, 1, 12, 7), random_lens(16, 500, 3000, 8)
    q, k, v, table, seqused, cu = gpu_group_case(rows, keys, 16, 8, seed=7, num_slots=2_200_000,
                                                 first_slot=2_000_000)
    assert int(table.max()) * 8 * 128 >= 2**31
    out = paged_group_attend(q, k, v, table, seqused, cu, 0.09, num_splits=4)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, table, seqused, cu, 0.09)[0]) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_gpu_cuda_graph_replay(device, kv_dtype):
    """Captured once for 128 rows with the groups padded to 128 (graph_cascade_metadata's
    layout), replayed in the same buffers with new layouts, prefix lengths, slots and
    queries: 16 groups of 8; one group of all 128 rows (8 chunks at G = 4); 40 groups of 3,
    a group of the 8 padding rows without keys, then 87 empty groups. fp8: the cache in
    float8_e4m3fn with per-head scales, against the reference over its dequantized values."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    bs, hq, hkv, d, width = 128, 32, 8, 128, 4096
    _, k, v, _, _ = gpu_case([width] * 8, hq, hkv, seed=0)
    valid = torch.isfinite(k[:, 0, 0]).nonzero().flatten().to(torch.int32)
    scales: dict[str, object] = {}
    ref_k, ref_v = k, v
    if kv_dtype == "fp8":
        k, v, k_scale, v_scale = to_fp8_case(k, v)
        scales = dict(k_scale=k_scale, v_scale=v_scale, config=FP8_GROUP_CONFIG)
        ref_k, ref_v = dequantize_fp8(k, k_scale), dequantize_fp8(v, v_scale)
    cuda = dict(device="cuda")
    s_q = torch.empty(bs, hq, d, dtype=torch.bfloat16, **cuda)
    s_table = torch.zeros(bs, width, dtype=torch.int32, **cuda)
    s_used = torch.zeros(bs, dtype=torch.int32, **cuda)
    s_cu = torch.zeros(bs + 1, dtype=torch.int32, **cuda)
    num_splits = choose_group_splits(bs, bs, hq, hkv, torch.cuda.get_device_properties(0).multi_processor_count)
    ws = make_workspace(bs, hq, d, num_splits, "cuda") if num_splits > 1 else None
    out = torch.empty_like(s_q)

    def fill(sizes: list[int], seed: int) -> None:
        """Groups of `sizes` rows with 1..width keys each, then (rows left) a padding group
        without keys, then empty groups; table entries past each length are slot 0 (NaN)."""
        g = torch.Generator(device="cuda").manual_seed(seed)
        padding = [bs - sum(sizes)] if sum(sizes) < bs else []
        cu = list(accumulate(sizes + padding, initial=0))
        s_cu.copy_(torch.tensor(cu + [bs] * (bs + 1 - len(cu)), dtype=torch.int32))
        used = torch.zeros(bs, dtype=torch.int32, **cuda)
        used[: len(sizes)] = torch.randint(1, width + 1, (len(sizes),), generator=g, **cuda).to(torch.int32)
        s_used.copy_(used)
        s_q.normal_(generator=g)
        picks = valid[torch.randint(0, len(valid), (bs, width), generator=g, **cuda)]
        s_table.copy_(picks.masked_fill(torch.arange(width, **cuda) >= s_used[:, None], 0))

    def call():
        return paged_group_attend(s_q, k, v, s_table, s_used, s_cu, 0.1, num_splits, out=out, workspace=ws,
                                  return_lse=True, **scales)

    fill([8] * 16, 1)
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = call()
    for seed, sizes in enumerate(([8] * 16, [bs], [3] * 40), start=2):
        fill(sizes, seed)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(s_q, ref_k, ref_v, s_table, s_used, s_cu, 0.1)
        assert torch.isfinite(out).all(), sizes
        assert rel_err(out, ref_out) < 1e-2, sizes
        torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)
