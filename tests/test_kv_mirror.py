"""The CPU backend's kept K/V copies (attention/kv_mirror.py) across many steps of one backend:
every step's output must equal the per-sequence reference whatever happened to the pool
between steps (sequences finishing, joining mid-decode, retracted and re-admitted onto the
same slots, aborted, cached prefixes shared with other sequences, prefill chunks beside the
decodes), and steady decode copies only the new tokens' K/V."""

from __future__ import annotations

import math
import random

import pytest
import torch

from radixserve.model_runner.attention.cpu_backend import CPUAttention
from radixserve.model_runner.attention.kv_mirror import KVMirror
from radixserve.model_runner.attention.torch_backend import TorchAttention
from radixserve.model_runner.forward_batch import ForwardBatch

LAYERS = 2


class Pool:
    """A miniature of the engine's KV bookkeeping: a LIFO free list (a freed slot is the next
    one handed out, as the allocator does), table rows, and per-layer K/V that each step
    writes at its new tokens' slots."""

    def __init__(self, num_slots: int, rows: int, width: int, hkv: int, d: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(num_slots + 1, hkv, d, generator=self.g) for _ in range(LAYERS)]
        self.v = [torch.randn(num_slots + 1, hkv, d, generator=self.g) for _ in range(LAYERS)]
        self.free = list(range(num_slots, 0, -1))
        self.free_rows = list(range(rows - 1, -1, -1))
        self.table = torch.zeros(rows, width, dtype=torch.int64)
        self.seqs: dict[int, list[int]] = {}  # row -> slot list (the K/V computed so far)

    def admit(self, length: int, shared_from: int | None = None, shared: int = 0) -> tuple[int, int]:
        """A new sequence of `length` tokens (the first `shared` the slots of row `shared_from`:
        a cached prefix); returns (row, tokens already cached)."""
        row = self.free_rows.pop()
        head = self.seqs[shared_from][:shared] if shared_from is not None else []
        self.seqs[row] = head + [self.free.pop() for _ in range(length - len(head))]
        return row, len(head)

    def release(self, row: int) -> None:
        """Finish, abort or retract a sequence: its slots that no other sequence holds go back."""
        mine = self.seqs.pop(row)
        held = {s for seq in self.seqs.values() for s in seq}
        self.free += [s for s in reversed(mine) if s not in held]
        self.free_rows.append(row)

    def extend(self, row: int) -> None:
        self.seqs[row].append(self.free.pop())


def step(backend, ref, pool: Pool, work: list[tuple[int, int]], hq: int, d: int) -> None:
    """One forward: sequence `row` computes its tokens from `start` on; both backends must agree."""
    out_slots = [s for row, start in work for s in pool.seqs[row][start:]]
    for row, _ in work:
        pool.table[row, : len(pool.seqs[row])] = torch.tensor(pool.seqs[row])
    n = len(out_slots)
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64), positions=torch.zeros(n, dtype=torch.int64),
        out_slots=torch.tensor(out_slots, dtype=torch.int64), req_rows=[row for row, _ in work],
        prefix_lens=[start for _, start in work], extend_lens=[len(pool.seqs[r]) - s for r, s in work],
        logits_rows=torch.zeros(0, dtype=torch.int64),
    )
    backend.prepare(batch, pool.table)
    ref.prepare(batch, pool.table)
    slots = torch.tensor(out_slots, dtype=torch.int64)
    for layer in range(LAYERS):
        # The runner's order: this layer's new K/V into the pool, then attention.
        pool.k[layer][slots] = torch.randn(n, *pool.k[layer].shape[1:], generator=pool.g)
        pool.v[layer][slots] = torch.randn(n, *pool.v[layer].shape[1:], generator=pool.g)
        q = torch.randn(n, hq, d, generator=pool.g)
        got = backend.attend(q, pool.k[layer], pool.v[layer], 1 / math.sqrt(d))
        want = ref.attend(q, pool.k[layer], pool.v[layer], 1 / math.sqrt(d))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def decode_all(pool: Pool) -> list[tuple[int, int]]:
    work = []
    for row in pool.seqs:
        pool.extend(row)
        work.append((row, len(pool.seqs[row]) - 1))
    return work


@pytest.mark.parametrize("auto_cascade", [0, 8], ids=["plain", "cascade"])
@pytest.mark.parametrize("seed", range(4))
def test_a_backend_kept_across_random_steps_equals_the_reference(auto_cascade, seed):
    """Random lifecycles: decodes, finishes, aborts, retraction and re-admission (the freed
    slots come straight back, so positions keep their slot numbers with new K/V), new
    sequences with a cached prefix, chunked prefills beside the decodes."""
    rng = random.Random(seed)
    hq, hkv, d = 6, 2, 16
    pool = Pool(num_slots=900, rows=10, width=200, hkv=hkv, d=d, seed=seed)
    backend, ref = CPUAttention(auto_cascade), TorchAttention()
    for _ in range(4):
        row, cached = pool.admit(rng.randrange(20, 40))
        step(backend, ref, pool, [(row, cached)], hq, d)
    for _ in range(40):
        event = rng.random()
        work = decode_all(pool)
        if event < 0.15 and len(pool.seqs) > 1:  # retraction (or abort) and re-admission at once
            victim = rng.choice(list(pool.seqs))
            length = len(pool.seqs[victim])
            pool.release(victim)
            work = [(r, s) for r, s in work if r != victim]
            row, cached = pool.admit(length)  # the same slots, recomputed: new K/V
            work.append((row, cached))
        elif event < 0.3 and len(pool.seqs) > 1:  # a sequence finishes
            victim = rng.choice(list(pool.seqs))
            pool.release(victim)
            work = [(r, s) for r, s in work if r != victim]
        elif event < 0.5 and pool.free_rows:  # joins with a cached prefix of a running sequence
            donor = rng.choice(list(pool.seqs))
            shared = min(len(pool.seqs[donor]) - 1, rng.randrange(8, 30))
            row, cached = pool.admit(shared + rng.randrange(1, 20), donor, shared)
            work.append((row, cached))
        rng.shuffle(work)
        step(backend, ref, pool, work, hq, d)


def test_steady_decode_copies_only_the_new_tokens():
    """After the first decode step, each step copies in one position per sequence."""
    hq, hkv, d = 4, 2, 8
    pool = Pool(num_slots=600, rows=6, width=100, hkv=hkv, d=d, seed=1)
    backend, ref = CPUAttention(0), TorchAttention()
    for length in (30, 41, 17, 25):
        row, _ = pool.admit(length)
        step(backend, ref, pool, [(row, 0)], hq, d)
    for i in range(5):
        step(backend, ref, pool, decode_all(pool), hq, d)
        stale = decode_stale(backend)
        # The first step copies every real token (padding never); later ones each new token only.
        assert stale == (sum(map(len, pool.seqs.values())) if i == 0 else 4), stale


def decode_stale(backend) -> int:
    (p,) = backend._passes
    assert p.mirror is not None
    return int(p.mirror[1].stale_slots.numel())


def test_sequences_that_change_rows_keep_their_copies():
    """When the first sequences finish, the others move up a row each: each step still copies
    in one position per sequence (and the output equals the reference)."""
    hq, hkv, d = 4, 2, 8
    pool = Pool(num_slots=600, rows=6, width=100, hkv=hkv, d=d, seed=2)
    backend, ref = CPUAttention(0), TorchAttention()
    for length in (30, 41, 17, 25, 33):
        row, _ = pool.admit(length)
        step(backend, ref, pool, [(row, 0)], hq, d)
    step(backend, ref, pool, decode_all(pool), hq, d)
    for finished in range(3):
        pool.release(min(pool.seqs))  # the sequence in the first row
        step(backend, ref, pool, decode_all(pool), hq, d)
        assert decode_stale(backend) == len(pool.seqs), finished


def test_a_growing_batch_keeps_the_copies_of_its_sequences():
    """Sequences joining the decodes past the copies' capacity (more rows, longer keys): the
    copies grow and keep what they held, so the sequences decoding before copy in their new
    token only, the newcomers all of theirs."""
    hq, hkv, d = 4, 2, 8
    pool = Pool(num_slots=900, rows=8, width=200, hkv=hkv, d=d, seed=3)
    backend, ref = CPUAttention(0), TorchAttention()
    for length in (20, 31):
        row, _ = pool.admit(length)
        step(backend, ref, pool, [(row, 0)], hq, d)
    step(backend, ref, pool, decode_all(pool), hq, d)
    for length in (12, 90, 150):  # more rows each time; 90 and 150 keys outgrow the length too
        work = decode_all(pool)  # the newcomer's prefill beside the decodes, as the engine batches it
        row, _ = pool.admit(length)
        step(backend, ref, pool, work + [(row, 0)], hq, d)
        old = len(pool.seqs) - 1
        step(backend, ref, pool, decode_all(pool), hq, d)
        assert decode_stale(backend) == old + len(pool.seqs[row]), length


def test_a_pool_too_small_for_the_copy_gathers_instead():
    """A window of more entries than the pool has slots reads the pool directly, and a later
    small window gets a copy again."""
    mirror = KVMirror()
    k = torch.randn(21, 2, 4)
    v = torch.randn(21, 2, 4)
    slots = torch.arange(1, 21).view(2, 10)
    assert mirror.read(mirror.plan(slots, slots.reshape(-1)), k, v) is None  # 2 x 64 > 21 slots
    small = torch.arange(1, 5).view(1, 4)
    plan = mirror.plan(small, small.reshape(-1))
    assert mirror.read(plan, torch.randn(200, 2, 4), torch.randn(200, 2, 4)) is not None


def test_a_new_pool_tensor_is_read_afresh():
    """A copy belongs to the pool tensor it was read from: another tensor (a new engine's
    pool, a test's) is read whole, never through the old copy."""
    mirror = KVMirror()
    slots = torch.tensor([[3, 1, 2]])
    k1, v1 = torch.randn(100, 1, 4), torch.randn(100, 1, 4)
    mirror.read(mirror.plan(slots, torch.tensor([2])), k1, v1)
    k2, v2 = torch.randn(100, 1, 4), torch.randn(100, 1, 4)
    got = mirror.read(mirror.plan(slots, torch.tensor([2])), k2, v2)
    assert got is not None
    assert torch.equal(got[0][0, :, :3].transpose(0, 1), k2[slots[0]])
    assert torch.equal(got[1][0, :, :3].transpose(0, 1), v2[slots[0]])


def test_release_drops_the_kept_copies(tiny_qwen3_path, make_engine):
    """A shut-down engine's runner releases its memory, the backend's K/V copies with it."""
    from radixserve import SamplingParams

    engine = make_engine(tiny_qwen3_path)
    engine.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    backend = engine.core.runner.backend
    assert any(m.layers for m in backend._mirrors.values())
    engine.core.runner.release_memory()
    assert not backend._mirrors
