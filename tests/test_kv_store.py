"""The pool's K/V write (model_runner/kv_store.py): the Triton store kernel against indexed copies.

Runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1; `make test` runs this
file so) or on a GPU. Inputs are views of one fused qkv tensor, as the model passes them
(rows strided by the q, k and v heads together), and the slots are scattered, with
padding rows pointing at the dummy slot 0.
"""

from __future__ import annotations

import pytest
import torch

from radixserve.model_runner.kv_store import FP8_MAX, quantize_kv, store_kv


def make_case(tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_heads = 2 * kv_heads
    qkv = (torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen) * 3).to(dtype).to(device)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(4 * tokens, generator=gen)[:tokens] + 1
    slots[-1] = 0  # a padding row
    return k, v, slots.to(device)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal e4m3 (or other) values; -0 and +0 count as one (the H100's cast of -0.0 stores +0)."""
    return torch.equal(a.float(), b.float())


def pools(slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str):
    shape = (slots + 1, kv_heads, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("shape", [(5, 1, 16), (37, 2, 32), (64, 3, 24), (19, 8, 64)],
                         ids=lambda s: "t{}-h{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernel_writes_what_indexed_copies_write(device, shape, dtype):
    tokens, kv_heads, head_dim = shape
    k, v, slots = make_case(tokens, kv_heads, head_dim, dtype, device)
    expect_k, expect_v = pools(4 * tokens, kv_heads, head_dim, dtype, device)
    store_kv(expect_k, expect_v, slots, k, v, kernel=False)
    got_k, got_v = pools(4 * tokens, kv_heads, head_dim, dtype, device)
    store_kv(got_k, got_v, slots, k, v, kernel=True)
    assert torch.equal(got_k, expect_k) and torch.equal(got_v, expect_v)
    assert torch.equal(got_k[slots[:-1]], k[:-1]), "every real row lands at its slot"


@pytest.mark.parametrize("shape", [(37, 2, 32), (19, 8, 64), (8, 3, 24)], ids=lambda s: "t{}-h{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_quantizes_to_fp8_as_the_reference_does(device, shape, dtype):
    tokens, kv_heads, head_dim = shape
    k, v, slots = make_case(tokens, kv_heads, head_dim, dtype, device, seed=1)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 500.0, -449.0], dtype=dtype)  # saturate at +-448 after the scale
    # Scales that differ by head, so that a head mix-up shows.
    k_scale = torch.linspace(0.5, 2.0, kv_heads, device=device)
    v_scale = torch.linspace(1.5, 0.25, kv_heads, device=device)
    fp8 = torch.float8_e4m3fn
    expect_k, expect_v = pools(4 * tokens, kv_heads, head_dim, fp8, device)
    store_kv(expect_k, expect_v, slots, k, v, k_scale, v_scale, kernel=False)
    got_k, got_v = pools(4 * tokens, kv_heads, head_dim, fp8, device)
    store_kv(got_k, got_v, slots, k, v, k_scale, v_scale, kernel=True)
    assert same_values(got_k, expect_k) and same_values(got_v, expect_v)
    stored = got_k[slots[0], 0, :4].float() * k_scale[0]
    assert stored.abs().max().item() == pytest.approx(FP8_MAX * k_scale[0].item())
    assert not torch.isnan(got_k.float()).any() and not torch.isnan(got_v.float()).any()


def test_quantize_rounds_to_the_nearest_e4m3_within_its_relative_step():
    x = torch.randn(64, 4, 32) * 10
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
    back = quantize_kv(x, scale).float() * scale.view(1, -1, 1)
    # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself.
    normal = x.abs() / scale.view(1, -1, 1) >= 2.0 ** -6
    assert ((back - x).abs()[normal] <= x.abs()[normal] * 2.0 ** -4 + 1e-6).all()


def test_an_fp8_pool_needs_its_scales():
    k_cache, v_cache = pools(4, 1, 8, torch.float8_e4m3fn, "cpu")
    k = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        store_kv(k_cache, v_cache, torch.tensor([1, 2]), k, k)


def test_the_kernel_rounds_every_binade_and_tie_as_torch_does(device):
    """Every e4m3 value, the midpoints between neighbours (ties go to even) and points just
    off them, both signs, written through the kernel and through torch's cast."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids * (1 + 2**-12), mids * (1 - 2**-12), torch.tensor([500.0, 1e30])])
    values = torch.cat([values, -values])
    pad = (-len(values)) % 16
    x = torch.cat([values, torch.zeros(pad)]).view(-1, 1, 16).to(device)
    slots = torch.arange(1, x.shape[0] + 1, device=device)
    scale = torch.ones(1, device=device)
    expect = pools(x.shape[0], 1, 16, torch.float8_e4m3fn, device)
    got = pools(x.shape[0], 1, 16, torch.float8_e4m3fn, device)
    store_kv(*expect, slots, x, x, scale, scale, kernel=False)
    store_kv(*got, slots, x, x, scale, scale, kernel=True)
    assert same_values(got[0], expect[0])
