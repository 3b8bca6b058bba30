"""Split-KV paged decode in Triton on the GPU: bf16 at model sizes, a pool past int32
element offsets, and inside a CUDA graph, over bf16 and fp8 (float8_e4m3fn) caches (the
CPU cases, under Triton's interpreter, are in tests/test_triton_decode.py, whose torch
reference these share)."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from helpers.triton_cases import dequantize_fp8, gpu_case, random_lens, rel_err, to_fp8_case
from test_triton_decode import reference

from radixserve.model_runner.attention.triton_decode import (
    FP8_DECODE_CONFIG,
    DecodeWorkspace,
    KernelConfig,
    choose_num_splits,
    make_workspace,
    paged_decode,
)
from radixserve.model_runner.kv_store import quantize_kv


class GraphInputs(NamedTuple):
    """A decode batch's static buffers under a CUDA graph: what each replay reads, and where it writes."""

    q: torch.Tensor  # [B, Hq, D]
    table: torch.Tensor  # [B, width] int32
    used: torch.Tensor  # [B] int32
    workspace: DecodeWorkspace
    out: torch.Tensor


def graph_inputs(q: torch.Tensor, width: int, num_splits: int) -> GraphInputs:
    batch, hq, d = q.shape
    return GraphInputs(
        torch.empty_like(q), torch.zeros(batch, width, dtype=torch.int32, device=q.device),
        torch.zeros(batch, dtype=torch.int32, device=q.device), make_workspace(batch, hq, d, num_splits, q.device),
        torch.empty_like(q),
    )


def refill(inputs: GraphInputs, valid: torch.Tensor, seed: int) -> None:
    """New queries, lengths up to the table's width, slots drawn from the pool's `valid` ones;
    entries past each length are slot 0 (NaN)."""
    batch, width = inputs.table.shape
    device = inputs.q.device
    g = torch.Generator(device=device).manual_seed(seed)
    inputs.q.normal_(generator=g)
    inputs.used.copy_(torch.randint(1, width + 1, (batch,), generator=g, device=device))
    picks = valid[torch.randint(0, len(valid), (batch, width), generator=g, device=device)]
    inputs.table.copy_(picks.masked_fill(torch.arange(width, device=device) >= inputs.used[:, None], 0))


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
    num_splits = 8
    static = graph_inputs(q, width, num_splits)
    valid = torch.isfinite(k[:, 0, 0]).nonzero().flatten().to(torch.int32)

    def call():
        return paged_decode(static.q, k, v, static.table, static.used, 0.1, num_splits, out=static.out,
                            workspace=static.workspace, return_lse=True)

    refill(static, valid, 1)
    call()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = call()
    for seed in (2, 3):
        refill(static, valid, seed)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(static.q, k, v, static.table, static.used, 0.1)
        assert rel_err(static.out, ref_out) < 1e-2
        torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)], ids=["qwen3-0.6b", "qwen3-8b"])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_fp8_matches_reference(device, heads, batch):
    """bf16 q over an fp8 cache (per-head scales, saturated keys, NaN outside the sequences'
    slots): the reference over the dequantized cache, at the split counts and tile configs
    of the bf16 test plus the fp8 config."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    q, k, v, table, seqused = gpu_case(random_lens(batch, 1, 2048, batch), *heads, seed=batch, num_slots=1 << 19)
    k8, v8, k_scale, v_scale = to_fp8_case(k, v)
    del k, v
    scale = 1 / math.sqrt(128)
    ref_out, ref_lse = reference(q, dequantize_fp8(k8, k_scale), dequantize_fp8(v8, v_scale), table, seqused, scale)
    auto = choose_num_splits(batch, heads[1], torch.cuda.get_device_properties(0).multi_processor_count)
    for num_splits in sorted({auto, 1, 5}):
        for config in (FP8_DECODE_CONFIG, KernelConfig(), KernelConfig(32, 4, 4), KernelConfig(256, 4, 2)):
            out, lse = paged_decode(q, k8, v8, table, seqused, scale, num_splits, return_lse=True, config=config,
                                    k_scale=k_scale, v_scale=v_scale)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), (num_splits, config)
            assert rel_err(out, ref_out) < 1e-2, (num_splits, config)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_fp8_cuda_graph_replay(device):
    """An fp8 cache in a captured graph, replayed with new lengths, slots, queries and new
    scale values written into the same scale tensors (read on the device at replay),
    then with a per-tensor scale expanded to every head (a stride-0 view, copied inside
    the graph)."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    batch, hq, hkv, width = 32, 32, 8, 4096
    q, k, v, _, _ = gpu_case(random_lens(batch, 1, width, 0), hq, hkv, seed=0, num_slots=1 << 18)
    valid = torch.isfinite(k[:, 0, 0]).nonzero().flatten().to(torch.int32)
    k_real, v_real = k.float(), v.float()
    del k, v
    k_scale = torch.empty(hkv, dtype=torch.float32, device="cuda")
    v_scale = torch.empty_like(k_scale)
    k8 = torch.empty(k_real.shape, dtype=torch.float8_e4m3fn, device="cuda")
    v8 = torch.empty_like(k8)
    num_splits = 8
    static = graph_inputs(q, width, num_splits)

    def fill(seed: int, ks: torch.Tensor, vs: torch.Tensor) -> None:
        refill(static, valid, seed)
        k_scale.copy_(ks)
        v_scale.copy_(vs)
        k8.copy_(quantize_kv(k_real, ks))  # the pool rewritten with the new scales
        v8.copy_(quantize_kv(v_real, vs))

    def capture(ks: torch.Tensor, vs: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        def call():
            return paged_decode(static.q, k8, v8, static.table, static.used, 0.1, num_splits, out=static.out,
                                workspace=static.workspace, return_lse=True, config=FP8_DECODE_CONFIG,
                                k_scale=ks, v_scale=vs)

        call()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, lse = call()
        return graph, lse

    heads = torch.arange(1, hkv + 1, dtype=torch.float32, device="cuda")
    fill(1, heads / 200, heads / 150)
    graph, lse = capture(k_scale, v_scale)
    for seed, ks, vs in ((2, heads / 100, heads / 300), (3, heads.flip(0) / 150, heads.flip(0) / 100)):
        fill(seed, ks, vs)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(static.q, dequantize_fp8(k8, ks), dequantize_fp8(v8, vs), static.table,
                                     static.used, 0.1)
        assert rel_err(static.out, ref_out) < 1e-2, seed
        torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)

    one = torch.full((1,), 0.02, device="cuda")  # a per-tensor scale, expanded to every head
    graph, lse = capture(one.expand(hkv), one.expand(hkv))
    fill(4, one.expand(hkv), one.expand(hkv))
    one.fill_(0.03)  # the graph's copy of the expanded view reads it at replay
    k8.copy_(quantize_kv(k_real, one.expand(hkv)))
    v8.copy_(quantize_kv(v_real, one.expand(hkv)))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = reference(static.q, dequantize_fp8(k8, one.expand(hkv)), dequantize_fp8(v8, one.expand(hkv)),
                                 static.table, static.used, 0.1)
    assert rel_err(static.out, ref_out) < 1e-2
    torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=2e-2)
