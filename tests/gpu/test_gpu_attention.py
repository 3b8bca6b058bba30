"""Every fast attention backend against the torch reference (fp32) on random pools.

Each case scatters slots at random through a pool whose unused slots hold
large garbage (a backend that reads a wrong slot is far off), points table
entries past each sequence's length at garbage too, fills freed device memory
with NaN before the call (so an output row nobody wrote shows up as NaN), and
draws fresh random inputs per case. bf16/fp16 outputs must be within 1e-2
relative error (‖out − ref‖ / ‖ref‖) of the fp32 reference.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers.cascade_cases import CASES as CASCADE_CASES
from helpers.cascade_cases import make_cascade_case

from radixserve.model_runner.attention import available_backends, create_backend
from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.model_runner.forward_batch import ForwardBatch

pytestmark = pytest.mark.gpu

# "fa4" runs decode passes with the Triton split-KV kernel where Triton is installed;
# "fa4:no-triton" keeps them on FA4.
FAST = ["fa4", "fa4:no-triton", "torch_varlen"]
GARBAGE = 300.0

# (prefix_len, extend_len) per sequence; None entries are drawn at random per seed.
CASES = {
    "decode": lambda g: [(_rand(g, 1, 1500), 1) for _ in range(48)],
    "fresh_prefill": lambda g: [(0, _rand(g, 1, 700)) for _ in range(6)],
    "extend_over_prefix": lambda g: [(_rand(g, 1, 900), _rand(g, 2, 300)) for _ in range(8)],
    "mixed": lambda g: [(0, 1), (0, 257), (5, 1), (1200, 1), (300, 64), (0, 3), (17, 129), (2047, 1)],
    "long": lambda g: [(8191, 1), (3000, 1000), (0, 1)],
}
HEADS = [(16, 8, 128), (32, 8, 128), (8, 8, 64), (16, 2, 64)]  # (Hq, Hkv, D): Qwen3-0.6B, -8B, MHA, GQA 8


def _rand(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _backend(name: str):
    name, _, variant = name.partition(":")
    if name not in available_backends("cuda"):
        pytest.skip(f"{name} is not available here (available: {available_backends('cuda')})")
    if name == "fa4":
        backend = create_backend(name, "cuda", triton_decode=False if variant == "no-triton" else None)
        assert backend.triton_decode == (variant != "no-triton"), "Triton is on the device image: the default uses it"
        return backend
    return create_backend(name, "cuda")


def make_case(specs, hq, hkv, d, dtype, seed, poison_unused=GARBAGE):
    """A pool, a request table and a batch computing `specs` [(prefix, extend)]."""
    g = torch.Generator().manual_seed(seed)
    total = sum(p + e for p, e in specs)
    num_slots = 2 * total + 64
    k = torch.randn(num_slots + 1, hkv, d, generator=g)
    v = torch.randn(num_slots + 1, hkv, d, generator=g)
    perm = torch.randperm(num_slots, generator=g) + 1
    used, unused = perm[:total], perm[total:]
    k[unused], v[unused], k[0], v[0] = poison_unused, poison_unused, poison_unused, poison_unused
    max_context = max(p + e for p, e in specs) + 37
    rows = (torch.randperm(len(specs) + 5, generator=g)[: len(specs)]).tolist()
    table = unused[torch.randint(0, len(unused), (len(specs) + 5, max_context), generator=g)]
    out_slots, start = [], 0
    for row, (p, e) in zip(rows, specs):
        slots = used[start : start + p + e]
        start += p + e
        table[row, : p + e] = slots
        out_slots.append(slots[p:])
    n = sum(e for _, e in specs)
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.zeros(n, dtype=torch.int64),
        out_slots=torch.cat(out_slots),
        req_rows=rows,
        prefix_lens=[p for p, _ in specs],
        extend_lens=[e for _, e in specs],
        logits_rows=torch.zeros(0, dtype=torch.int64),
    ).to(torch.device("cuda"))
    q = torch.randn(n, hq, d, generator=g)
    cuda = dict(device="cuda")
    return (q.to(dtype=dtype, **cuda), k.to(dtype=dtype, **cuda), v.to(dtype=dtype, **cuda),
            table.to(**cuda), batch)


def reference(q, k, v, table, batch, scale):
    ref = TorchAttention()
    ref.prepare(batch, table)
    return ref.attend(q.float(), k.float(), v.float(), scale)


def poison_allocator(nbytes: int) -> None:
    """Fill freed memory with NaN bytes, so a fresh output buffer starts as NaN."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)


def run_backend(backend, q, k, v, table, batch, scale):
    backend.prepare(batch, table)
    poison_allocator(q.numel() * q.element_size())
    out = backend.attend(q, k, v, scale)
    torch.cuda.synchronize()
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}-{}-d{}".format(*h))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", FAST)
def test_backend_matches_reference(name, case, heads):
    backend = _backend(name)
    hq, hkv, d = heads
    for seed in (0, 1):
        specs = CASES[case](torch.Generator().manual_seed(seed))
        q, k, v, table, batch = make_case(specs, hq, hkv, d, torch.bfloat16, seed)
        scale = 1.0 / math.sqrt(d)
        out = run_backend(backend, q, k, v, table, batch, scale)
        ref = reference(q, k, v, table, batch, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        bad_rows = (~torch.isfinite(out)).any(-1).any(-1).nonzero().flatten().tolist()
        assert torch.isfinite(out).all(), f"unwritten or NaN rows: {bad_rows[:10]}"
        err = rel_err(out, ref)
        assert err < 1e-2, f"{name} {case} {heads} seed {seed}: relative error {err:.2e}"


@pytest.mark.parametrize("name", FAST)
def test_backend_fp16_and_custom_scale(name):
    backend = _backend(name)
    specs = CASES["mixed"](None)
    q, k, v, table, batch = make_case(specs, 16, 4, 128, torch.float16, seed=3)
    out = run_backend(backend, q, k, v, table, batch, 0.05)
    assert rel_err(out, reference(q, k, v, table, batch, 0.05)) < 1e-2


@pytest.mark.parametrize("name", FAST)
def test_unused_slots_may_hold_nan(name):
    """Slots outside a sequence's list (and table entries past its length) are never read."""
    backend = _backend(name)
    specs = CASES["mixed"](None)
    q, k, v, table, batch = make_case(specs, 16, 8, 128, torch.bfloat16, seed=4, poison_unused=float("nan"))
    out = run_backend(backend, q, k, v, table, batch, 0.1)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, table, batch, 0.1)) < 1e-2


@pytest.mark.parametrize("name", FAST)
def test_fp32_calls_use_the_reference(name):
    """A forced fast backend serves fp32 (which its kernel cannot) with the reference's numerics."""
    backend = _backend(name)
    specs = CASES["extend_over_prefix"](torch.Generator().manual_seed(5))
    q, k, v, table, batch = make_case(specs, 8, 2, 64, torch.float32, seed=5)
    out = run_backend(backend, q, k, v, table, batch, 0.125)
    torch.testing.assert_close(out, reference(q, k, v, table, batch, 0.125), rtol=1e-5, atol=1e-5)


def test_backend_reused_across_batches():
    """prepare() replaces all per-batch state: a decode batch after a prefill batch is right."""
    for name in [n for n in FAST if n in available_backends("cuda")]:
        backend = create_backend(name, "cuda")
        for seed, case in enumerate(["fresh_prefill", "decode", "extend_over_prefix"]):
            specs = CASES[case](torch.Generator().manual_seed(seed))
            q, k, v, table, batch = make_case(specs, 16, 8, 128, torch.bfloat16, seed=10 + seed)
            out = run_backend(backend, q, k, v, table, batch, 0.09)
            assert rel_err(out, reference(q, k, v, table, batch, 0.09)) < 1e-2, (name, case)


def test_registry_on_this_machine():
    cuda = available_backends("cuda")
    assert cuda[-1] == "torch" and cuda[0] in ("fa4", "torch_varlen", "torch")
    assert available_backends("cpu") == ["cpu", "torch"]
    assert create_backend("auto", "cuda").name == cuda[0]
    assert create_backend("auto", "cuda", torch.bfloat16, 128).name == cuda[0]
    assert create_backend("auto", "cuda", torch.float32, 128).name == "torch"
    assert create_backend("auto", "cpu").name == "cpu"
    with pytest.raises(ValueError, match="attention_backend must be"):
        create_backend("flashinfer", "cuda")
    with pytest.raises(ValueError, match="not available on cpu"):
        create_backend("fa4", "cpu")


# -- cascade attention: shared prefixes attended once per group ------------------------------------


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}-{}-d{}".format(*h))
@pytest.mark.parametrize("case", sorted(CASCADE_CASES))
@pytest.mark.parametrize("name", ["fa4", "fa4:no-triton"])
def test_fa4_cascade_matches_reference(case, heads, name):
    """Prefix pass + suffix pass + merge against the reference without a cascade."""
    backend = _backend(name)
    q, k, v, table, batch = make_cascade_case(
        CASCADE_CASES[case], *heads, seed=7, dtype=torch.bfloat16, device="cuda"
    )
    scale = 1.0 / math.sqrt(heads[2])
    out = run_backend(backend, q, k, v, table, batch, scale)
    ref = reference(q, k, v, table, dataclasses.replace(batch, cascade=None), scale)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < 1e-2, f"fa4 cascade {case} {heads}: relative error {err:.2e}"
