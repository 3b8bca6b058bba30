"""Token-granular KV storage: the pool of slots, its allocator, and the request-to-slot table.

A *slot* holds the K and V of one token in every layer. Slot 0 is a dummy that
padding rows write into and never read; real slots are 1..num_slots.

Ownership (kept by the scheduler, checked by `Scheduler.check_invariants`):

    every real slot is in exactly one of
      - the allocator's free list,
      - the radix tree (evictable or protected),
      - one running request's private tail (allocated, not yet inserted).

FP8 storage (`kv_dtype` float8_e4m3fn, written by kv_store.py): each layer has a K and a V scale per KV head
(`k_scale[layer]`, `v_scale[layer]`, `[kv_heads]` float32), and

    stored = e4m3(clamp(x / scale, -448, 448))      real = float(stored) * scale

The scales are fixed for the pool's life: the radix tree hands one request's slots to
later ones, so a slot must mean the same values whatever was written after it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from radixserve.model_runner.kv_store import FP8_KV_DTYPE, store_kv
from radixserve.model_runner.transfer import to_device


class KVScales(NamedTuple):
    """Per layer and KV head scales of an fp8 pool, `[num_layers, kv_heads]` float32 each."""

    k: torch.Tensor
    v: torch.Tensor


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored `[..., H, D]` values -> real values in `dtype` (`scale` None: a plain cast)."""
    if scale is None:
        return x.to(dtype)
    return (x.float() * scale.unsqueeze(-1)).to(dtype)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The real values `[n, H, D]` in `dtype` of the pool's `slots` `[n]`. One-byte caches are
    gathered as bytes (every device indexes uint8; not every one indexes float8)."""
    if cache.element_size() == 1:
        rows = cache.view(torch.uint8).index_select(0, slots).view(cache.dtype)
    else:
        rows = cache.index_select(0, slots)
    return dequantize_kv(rows, scale, dtype)


def fold_kv_scales(
    q: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over an fp8 pool read as raw e4m3 values: q `[T, Hq, D]` times its KV head's
    K scale (q . (k s) = (q s) . k), in float32, and the `[Hq, 1]` factor that the output
    then takes (softmax weights sum to one, so sum p (v s) = s sum p v). None: no scales."""
    if k_scale is None or v_scale is None:
        return q, None
    group = q.shape[1] // k_scale.shape[0]
    q = q.float() * k_scale.repeat_interleave(group).unsqueeze(-1)
    return q, v_scale.repeat_interleave(group).unsqueeze(-1)


class KVPool:
    """Per layer K and V tensors of shape `[num_slots + 1, kv_heads, head_dim]`.

    `dtype` is the model's (what K/V arrive in); `kv_dtype` what the pool stores (None:
    `dtype`). For an fp8 pool `scales` are the per layer and head scales (None: 1.0,
    vLLM's default where a checkpoint has none); for others `k_scale`/`v_scale` are None.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: torch.dtype | None = None,
        scales: KVScales | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.model_dtype = dtype
        self.dtype = dtype if kv_dtype is None else kv_dtype  # the storage dtype
        self.device = torch.device(device)
        shape = (num_slots + 1, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        self.k_scale: list[torch.Tensor] | None = None
        self.v_scale: list[torch.Tensor] | None = None
        if self.dtype == FP8_KV_DTYPE:
            if scales is None:
                ones = torch.ones(num_layers, kv_heads)
                scales = KVScales(ones, ones)
            for name, t in zip(("k", "v"), scales):
                if tuple(t.shape) != (num_layers, kv_heads):
                    raise ValueError(f"{name} scales have shape {tuple(t.shape)}, expected {(num_layers, kv_heads)}")
                if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                    raise ValueError(f"{name} scales must be finite and > 0")
            k_all, v_all = (t.to(device=self.device, dtype=torch.float32).contiguous() for t in scales)
            self.k_scale, self.v_scale = list(k_all), list(v_all)
        elif scales is not None:
            raise ValueError(f"KV scales are for an fp8 pool, this one stores {self.dtype}")

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's (K, V) scales `[kv_heads]`, or (None, None) for a pool of real values."""
        if self.k_scale is None or self.v_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * kv_heads * head_dim * itemsize

    @staticmethod
    def slots_for(budget_bytes: float, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """How many slots of `dtype` (the storage dtype: fp8 holds twice bf16's) fit in `budget_bytes`."""
        return max(0, int(budget_bytes // KVPool.bytes_per_slot(num_layers, kv_heads, head_dim, dtype)))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v `[T, kv_heads, head_dim]` at `slots` `[T]` (kv_store.store_kv: one Triton
        launch for both on the GPU, indexed copies elsewhere). An fp8 pool quantizes them with
        the layer's fixed scales, on the device (no host sync: decode graphs capture this)."""
        store_kv(self.k[layer], self.v[layer], slots, k, v, *self.scales(layer))


class SlotAllocator:
    """A free list of slot ids 1..num_slots.

    Kept as an int64 `array` used as a stack: allocation and freeing are O(n) in
    the number of slots moved, never in the pool's size. An array, not a list: a
    list of a million free slots is a million items for every full pass of the
    collector to visit, an array is one object.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.reset()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> array | None:
        """Take `n` slots (an int64 array), or None, taking nothing, if fewer are free."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        taken.reverse()
        return taken

    def free_ids(self) -> array:
        """The free slot ids (the allocator's own array: read, never modify)."""
        return self._free

    def free(self, slots: Sequence[int] | torch.Tensor) -> None:
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        self._free.extend(slots)

    def reset(self) -> None:
        # Reversed so that the first allocations get low slot ids (easier to read in tests).
        self._free = array("q", range(self.num_slots, 0, -1))


class ReqToTokenPool:
    """The page table with page size 1: `table[row, pos]` is the slot of token `pos` of a request."""

    def __init__(self, max_requests: int, max_context: int, device: torch.device | str) -> None:
        self.max_requests = max_requests
        self.max_context = max_context
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self._free_rows: list[int] = list(range(max_requests - 1, -1, -1))
        # Tensor parallelism: the writes since the last step was sent to the other ranks, each a
        # [3, n] host tensor (rows, columns, slots), which they apply to their own table (`apply`).
        self.log: list[torch.Tensor] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: Sequence[int] | torch.Tensor) -> None:
        self.write_many([(row, start, slots.tolist() if isinstance(slots, torch.Tensor) else slots)])

    def write_many(self, writes: Sequence[tuple[int, int, Sequence[int]]]) -> None:
        """`table[row, start:start+len(slots)] = slots` for every (row, start, slots), as one
        indexed write: on a GPU one host-to-device copy instead of one (and a sync) per request.

        A decode step brings one short write per request: the columns are split with zip
        and map, not a generator per column, so each write costs the host little."""
        writes = [w for w in writes if len(w[2])]
        if not writes:
            return
        row_ids, start_ids, pieces = zip(*writes)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        starts = np.array(start_ids, dtype=np.int64)
        ends = starts + lengths
        if int(ends.max()) > self.max_context:
            raise ValueError(f"request needs {int(ends.max())} positions, the table holds {self.max_context}")
        rows = np.repeat(np.array(row_ids, dtype=np.int64), lengths)
        # Column of each slot: its write's start plus its index within the write.
        total = int(lengths.sum())
        columns = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        if total >= 16 * len(pieces):  # long writes (prefill chunks): one buffer copy per write
            values = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        else:  # a decode step's one-slot writes: one pass over the slots (a conversion each costs more)
            values = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=total)
        packed = torch.from_numpy(np.stack([rows, columns, values]))
        if self.log is not None:
            self.log.append(packed)
        self.apply(packed)

    def apply(self, packed: torch.Tensor) -> None:
        """`table[packed[0], packed[1]] = packed[2]` (a write_many's packed form)."""
        packed = to_device(packed, self.table.device)
        self.table[packed[0], packed[1]] = packed[2]
