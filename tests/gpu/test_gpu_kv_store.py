"""The pool's K/V store kernel on the GPU: model sizes, fp8 bytes equal to torch's cast, and
inside a CUDA graph (the CPU cases, under Triton's interpreter, are in tests/test_kv_store.py,
whose case builders these share)."""

from __future__ import annotations

import pytest
import torch
from test_kv_store import make_case, pools, same_values

from radixserve.model_runner.kv_store import store_kv


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 16384])
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_gpu_store_writes_what_indexed_copies_write(device, tokens, pool_dtype):
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    k, v, slots = make_case(tokens, 8, 128, torch.bfloat16, device, seed=tokens)
    scales = (torch.linspace(0.5, 2, 8, device=device), torch.linspace(2, 0.25, 8, device=device))
    expect, got = pools(4 * tokens, 8, 128, pool_dtype, device), pools(4 * tokens, 8, 128, pool_dtype, device)
    store_kv(*expect, slots, k, v, *scales, kernel=False)
    store_kv(*got, slots, k, v, *scales, kernel=True)
    for a, b in zip(got, expect):
        assert same_values(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_gpu_store_replays_in_a_cuda_graph(device, pool_dtype):
    """Captured once, replayed on new K/V and new slots written into the static inputs."""
    if device != "cuda":
        pytest.skip("needs the GPU without the interpreter")
    tokens = 64
    k, v, slots = make_case(tokens, 8, 128, torch.bfloat16, device)
    scales = (torch.full((8,), 0.5, device=device), torch.full((8,), 2.0, device=device))
    cache = pools(4 * tokens, 8, 128, pool_dtype, device)
    store_kv(*cache, slots, k, v, *scales)  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(*cache, slots, k, v, *scales)
    new_k, new_v, new_slots = make_case(tokens, 8, 128, torch.bfloat16, device, seed=7)
    k.copy_(new_k)
    v.copy_(new_v)
    slots.copy_(new_slots)
    for c in cache:
        c.zero_()
    graph.replay()
    expect = pools(4 * tokens, 8, 128, pool_dtype, device)
    store_kv(*expect, new_slots, new_k, new_v, *scales, kernel=False)
    for a, b in zip(cache, expect):
        assert same_values(a, b)
