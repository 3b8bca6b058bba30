"""Batched next-token sampling on the device, every parameter per row.

`SamplingBatch.build` turns per-row inputs into device tensors (that is where
the Python loop over rows lives); `sample(logits, batch)` is then pure tensor
work: no loop over rows, no host sync. The caller copies `SampleOutput` to the
host when it needs the tokens. For the next step of the same rows, or of some
of them, `SamplingBatch.next_step` moves the batch on without the loop: only the
noise depends on the step, unless a row's penalties or suppressed ids depend on
its tokens. A structured-output mask changes every step: it is an argument of
`sample`, not part of the batch.

Order of processing, per row (greedy rows stop after step 3):

0. the structured-output mask (tokens the row's grammar forbids are -inf, packed
   bits from xgrammar, given per step: `TokenBitmask`), then allowed_token_ids
   (the others -inf) and logit_bias (added), both one [R, V] offset added to
   the rows that use them;
1. repetition penalty over prompt + output tokens (HF/vLLM: a logit < 0 is
   multiplied by the penalty, a logit >= 0 divided by it);
2. presence and frequency penalties over output tokens only (OpenAI:
   `logit -= frequency * count + presence * (count > 0)`);
3. suppressed ids (EOS/stop ids below min_tokens, the last token of a bad word
   the output is about to complete) set to -inf;
   greedy rows (temperature 0) take the argmax here;
4. temperature (`logits / T`);
5. top-k (ties with the k-th logit are kept), then top-p on the renormalized
   top-k distribution (the smallest most-likely-first set whose mass reaches p),
   then min-p (drop p < min_p * p_max), as Hugging Face orders its warpers;
6. a draw from what is left: Gumbel-max, `argmax(logits + G)` with
   `G = -log(-log(u))`, which is the exponential race `argmax(p / E)`.

Seeds: `u` is a counter-based hash of (seed, step, vocab index), so a row's
draw depends on nothing else in the batch (no torch.Generator, no shared state):
the same seed at the same step picks the same token in any batch, at any row.
The seed is hashed once per row on the host (`seed_keys`); the step joins it
where the noise is drawn, so moving a batch a step on is one add on the device.
The n completions of one request therefore need n seeds (the scheduler's job).
CPU (torch) and CUDA (Triton) hash the same bits; their logs may differ in the
last ulp, so a token can differ across devices only on a near-exact tie.

Logprobs are the model's raw distribution, `log_softmax` of the logits as given
(vLLM's default "raw logprobs"), not of the penalized/filtered/tempered ones: RL
trainers compute importance ratios against them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import xgrammar as xg

from radixserve.model_runner.forward_batch import SampleOutput, SamplingRow
from radixserve.model_runner.transfer import to_device
from radixserve.sampling_params import SamplingParams, top_count

try:  # On CUDA one Triton kernel does hash, noise and argmax in one pass (torch would take ~20).
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the torch path below computes the same thing
    triton = None

_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class _Penalties:
    """Penalty state of the rows that use any penalty (R of them) as dense [R, V] tensors."""

    rows: torch.Tensor | None  # [R] int64 rows of the batch; None means all rows, in order
    seen: torch.Tensor | None  # [R, V] bool, token in prompt + output; None: no row uses repetition
    repetition: torch.Tensor  # [R] float32, 1.0 for rows without
    counts: torch.Tensor | None  # [R, V] float32 output-token counts; None: no presence/frequency
    presence: torch.Tensor  # [R] float32
    frequency: torch.Tensor  # [R] float32


class TokenBitmask(NamedTuple):
    """One step's structured-output mask: xgrammar's packed int32 bits, [B, ceil(V/32)] on the
    logits' device (bit set: allowed), and the rows it constrains (the others are left alone)."""

    bits: torch.Tensor  # rows without a grammar have every bit set
    rows: list[int]


@dataclass(frozen=True)
class _Offset:
    """allowed_token_ids (-inf outside) and logit_bias (added) of the R rows that use either,
    as one dense [R, V] float32 tensor added to the logits."""

    rows: torch.Tensor | None  # [R] int64 rows of the batch; None means all rows, in order
    values: torch.Tensor  # [R, V] float32


class _Columns(NamedTuple):
    """Each row's values as the tensors hold them (greedy rows skip the filters: they cannot
    move an argmax), and what the rows use as a whole."""

    greedy: list[bool]
    temperature: list[float]  # 1.0 on greedy rows
    top_k: list[int]  # vocab_size where disabled
    top_p: list[float]  # +inf where disabled
    min_p: list[float]  # 0.0 where disabled
    all_greedy: bool
    any_greedy: bool
    uses_top_k: bool
    max_top_k: int
    uses_top_p: bool
    uses_min_p: bool
    num_logprobs: int | None


def _columns(params: Sequence[SamplingParams], vocab_size: int) -> _Columns:
    greedy = [p.temperature == 0.0 for p in params]
    sampled = [not g for g in greedy]
    top_k = [p.top_k if s and 0 < p.top_k < vocab_size else vocab_size for p, s in zip(params, sampled)]
    top_p = [p.top_p if s and p.top_p < 1.0 else float("inf") for p, s in zip(params, sampled)]
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
    requested = [p.logprobs for p in params if p.logprobs is not None]
    return _Columns(
        greedy=greedy,
        temperature=[p.temperature if s else 1.0 for p, s in zip(params, sampled)],
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        uses_top_k=min(top_k) < vocab_size,
        max_top_k=max((k for k in top_k if k < vocab_size), default=vocab_size),
        uses_top_p=min(top_p) < 1.0,
        uses_min_p=max(min_p) > 0.0,
        num_logprobs=max(top_count(k, vocab_size) for k in requested) if requested else None,
    )


@dataclass(frozen=True)
class SamplingBatch:
    """Device tensors for one step's sampling. Optional parts are None when no row uses them,
    so a batch that does not use a feature pays nothing for it."""

    size: int
    vocab_size: int
    params: tuple[SamplingParams, ...]  # each row's, on the host: what a subset's summaries come from
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows
    top_k: torch.Tensor | None  # [B] int64; vocab_size where disabled
    max_top_k: int  # the largest top_k below vocab_size (topk() width when top-p is off)
    top_p: torch.Tensor | None  # [B] float32; +inf where disabled
    log_min_p: torch.Tensor | None  # [B] float32 log(min_p); -inf where disabled
    penalties: _Penalties | None
    suppress: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids), both [S] int64
    offset: _Offset | None  # allowed_token_ids and logit_bias
    seed_keys: torch.Tensor | None  # [B] int64, each row's seed hashed (32 bits); None if all greedy
    steps: torch.Tensor | None  # [B] int64, each row's step; None if all greedy
    num_logprobs: int | None  # top alternatives to return (max over rows); None: no logprobs

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatch:
        if not rows:
            raise ValueError("rows must hold at least one SamplingRow")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        device = torch.device(device)
        params = tuple(r.params for r in rows)
        cols = _columns(params, vocab_size)
        # Two host->device copies carry every per-row scalar (small copies cost more than their bytes).
        floats = to_device(torch.tensor([cols.temperature, cols.top_p, cols.min_p], dtype=torch.float32), device)
        ints = torch.tensor([cols.greedy, cols.top_k], dtype=torch.int64)
        if not cols.all_greedy:
            ints = torch.cat([ints, _seed_keys_and_steps(rows)])
        ints = to_device(ints, device)
        return cls(
            size=len(rows),
            vocab_size=vocab_size,
            params=params,
            greedy=ints[0] != 0,
            all_greedy=cols.all_greedy,
            any_greedy=cols.any_greedy,
            temperature=floats[0],
            top_k=ints[1] if cols.uses_top_k else None,
            max_top_k=cols.max_top_k,
            top_p=floats[1] if cols.uses_top_p else None,
            log_min_p=floats[2].log() if cols.uses_min_p else None,
            penalties=_build_penalties(rows, vocab_size, device),
            suppress=_build_suppress(rows, vocab_size, device),
            offset=_build_offset(params, vocab_size, device),
            seed_keys=None if cols.all_greedy else ints[2],
            steps=None if cols.all_greedy else ints[3],
            num_logprobs=cols.num_logprobs,
        )

    def next_step(self, keep: Sequence[int] | None = None) -> SamplingBatch | None:
        """This batch one step later, each row having drawn one more token: every row, or the
        rows `keep` (indices into this batch) in that order. The tensors move on the device
        (an add, a gather each), with no loop over the rows' inputs. None when a row's
        sampling depends on its tokens (penalties, suppressed ids): only `build` knows those;
        also for a subset of rows with an offset (logit_bias, allowed_token_ids)."""
        if self.penalties is not None or self.suppress is not None:
            return None
        if keep is None:
            return self if self.steps is None else dataclasses.replace(self, steps=self.steps + 1)
        if not keep:
            raise ValueError("keep must hold at least one row")
        if self.offset is not None:  # static, but its rows are batch rows: a subset is rebuilt
            return None
        params = tuple(self.params[i] for i in keep)
        cols = _columns(params, self.vocab_size)
        index = to_device(torch.tensor(keep, dtype=torch.int64), self.greedy.device)

        def subset(rows: torch.Tensor | None) -> torch.Tensor:
            assert rows is not None, "a subset uses what the batch did, or less"
            return rows.index_select(0, index)

        def pick(rows: torch.Tensor | None, used: bool) -> torch.Tensor | None:
            return subset(rows) if used else None

        return SamplingBatch(
            size=len(keep),
            vocab_size=self.vocab_size,
            params=params,
            greedy=self.greedy.index_select(0, index),
            all_greedy=cols.all_greedy,
            any_greedy=cols.any_greedy,
            temperature=self.temperature.index_select(0, index),
            top_k=pick(self.top_k, cols.uses_top_k),
            max_top_k=cols.max_top_k,
            top_p=pick(self.top_p, cols.uses_top_p),
            log_min_p=pick(self.log_min_p, cols.uses_min_p),
            penalties=None,
            suppress=None,
            offset=None,
            seed_keys=pick(self.seed_keys, not cols.all_greedy),
            steps=None if cols.all_greedy else subset(self.steps) + 1,
            num_logprobs=cols.num_logprobs,
        )


def process_logits(logits: torch.Tensor, batch: SamplingBatch, bitmask: TokenBitmask | None = None) -> torch.Tensor:
    """The float32 [B, V] logits each row draws from (steps 0-5 of the module docstring).

    Removed tokens are -inf. Greedy rows stop after suppression (temperature 1, no
    filters): their token is the argmax of this. `logits` itself is never modified."""
    if logits.dim() != 2 or tuple(logits.shape) != (batch.size, batch.vocab_size):
        raise ValueError(f"logits must have shape ({batch.size}, {batch.vocab_size}), got {tuple(logits.shape)}")
    x = logits.float()
    if (bitmask is not None and bitmask.rows) or batch.offset is not None:
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # changed in place below; the raw logits are the logprobs' source
        if bitmask is not None and bitmask.rows:
            # Every row: the unconstrained rows' bits are all set (a no-op), and a list of indices
            # would be copied to the device from pageable memory, which waits for the GPU.
            xg.apply_token_bitmask_inplace(x, bitmask.bits, vocab_size=batch.vocab_size)
        if batch.offset is not None:
            if batch.offset.rows is None:
                x += batch.offset.values
            else:
                x.index_add_(0, batch.offset.rows, batch.offset.values)
    if batch.penalties is not None:
        x = _apply_penalties(x, batch.penalties)
    if batch.suppress is not None:
        x = x.index_put(batch.suppress, torch.full((), float("-inf"), device=x.device))
    if batch.all_greedy:
        return x
    return _filter(x / batch.temperature[:, None], batch)


def sample(logits: torch.Tensor, batch: SamplingBatch, bitmask: TokenBitmask | None = None) -> SampleOutput:
    """Pick one token per row of `logits` [B, V] (see the module docstring for the order)."""
    x = process_logits(logits, batch, bitmask)
    if batch.all_greedy:
        token_ids = x.argmax(dim=-1)
    else:
        token_ids = _draw(x, batch)

    logprobs = top_ids = top_logprobs = None
    if batch.num_logprobs is not None:
        all_logprobs = torch.log_softmax(logits.float(), dim=-1)  # raw: see the module docstring
        logprobs = all_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        if batch.num_logprobs > 0:
            top_logprobs, top_ids = all_logprobs.topk(batch.num_logprobs, dim=-1, sorted=True)
    return SampleOutput(token_ids, logprobs, top_ids, top_logprobs)


def _apply_penalties(x: torch.Tensor, pen: _Penalties) -> torch.Tensor:
    """Returns penalized logits; `x` itself is left untouched (it is the raw-logprob source)."""
    sub = x if pen.rows is None else x.index_select(0, pen.rows)
    if pen.seen is not None:
        factor = pen.repetition[:, None]
        sub = torch.where(pen.seen, torch.where(sub < 0, sub * factor, sub / factor), sub)
    if pen.counts is not None:
        sub = sub - pen.frequency[:, None] * pen.counts - pen.presence[:, None] * (pen.counts > 0)
    return sub if pen.rows is None else x.index_copy(0, pen.rows, sub)


def _filter(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, then top-p, then min-p on tempered logits: removed tokens become -inf."""
    neg_inf = float("-inf")
    if batch.top_p is not None:
        # One descending sort serves both top-k and top-p.
        sorted_x, order = x.sort(dim=-1, descending=True)
        if batch.top_k is not None:
            kth = sorted_x.gather(1, batch.top_k[:, None] - 1)
            sorted_x = sorted_x.masked_fill(sorted_x < kth, neg_inf)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # 0 for the most likely token: it always stays
        sorted_x = sorted_x.masked_fill(mass_before >= batch.top_p[:, None], neg_inf)
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    elif batch.top_k is not None:
        top_values = x.topk(batch.max_top_k, dim=-1, sorted=True).values
        kth = top_values.gather(1, batch.top_k.clamp(max=batch.max_top_k)[:, None] - 1)
        kth = kth.masked_fill(batch.top_k[:, None] >= batch.vocab_size, neg_inf)  # disabled rows
        x = x.masked_fill(x < kth, neg_inf)
    if batch.log_min_p is not None:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); no softmax needed.
        threshold = x.amax(dim=-1, keepdim=True) + batch.log_min_p[:, None]
        x = x.masked_fill(x < threshold, neg_inf)
    return x


def _draw(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """argmax(x + Gumbel noise) per row; greedy rows get no noise."""
    if x.is_cuda and triton is not None:
        return _draw_triton(x.contiguous(), batch)
    assert batch.seed_keys is not None and batch.steps is not None, "set unless the batch is all greedy"
    noise = _gumbel_noise(_noise_keys(batch.seed_keys, batch.steps), batch.vocab_size)
    if batch.any_greedy:
        noise = noise.masked_fill_(batch.greedy[:, None], 0.0)
    return (x + noise).argmax(dim=-1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding uint32 values.

    A product can pass 2**63 and wrap in int64; wraparound keeps the low 32 bits
    exact, and the mask keeps every value in [0, 2**32), so shifts stay logical."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def _seed_keys_and_steps(rows: Sequence[SamplingRow]) -> torch.Tensor:
    """[2, B] int64 (on the host): each row's seed (mod 2**64) hashed, and its step."""
    if any(r.step < 0 for r in rows):
        raise ValueError("SamplingRow.step must be >= 0")
    seeds = [int(r.seed) % (1 << 64) for r in rows]
    lo = torch.tensor([s & _U32 for s in seeds], dtype=torch.int64)
    hi = torch.tensor([s >> 32 for s in seeds], dtype=torch.int64)
    steps = torch.tensor([r.step for r in rows], dtype=torch.int64)
    return torch.stack([_mix32(_mix32(lo ^ 0x9E3779B9) ^ hi), steps])


def _noise_keys(seed_keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[2, B] int64 per-row keys from the seed keys and steps (mod 2**32): the hash counter's
    row part. The Triton kernel computes the same two keys per row."""
    key1 = _mix32(seed_keys ^ (steps & _U32))
    return torch.stack([key1, _mix32(key1 ^ 0x85EBCA6B)])


def _gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] standard Gumbel noise; element (b, i) depends only on keys[:, b] and i.

    Two mixing rounds keyed differently, so no two rows' noise is a reindexing of
    each other. u = (h + 0.5) / 2**32 lies in (0, 1); E = -log1p(-u) is Exp(1) and
    exact near 0, which is the tail that lets unlikely tokens win."""
    index = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    h = _mix32(_mix32(index[None, :] ^ keys[0, :, None]) ^ keys[1, :, None])
    u = (h.to(torch.float32) + 0.5) * (2.0**-32)
    return -torch.log(-torch.log1p(-u))


def _build_penalties(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device) -> _Penalties | None:
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    cnt = [i for i, r in enumerate(rows) if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    pen_rows = sorted(set(rep) | set(cnt))
    if not pen_rows:
        return None
    local = {row: j for j, row in enumerate(pen_rows)}  # batch row -> row of the [R, V] tensors
    shape = (len(pen_rows), vocab_size)
    seen = counts = None
    if rep:
        index = _flat_index([local[i] for i in rep], [rows[i].token_history for i in rep], vocab_size, device)
        seen = torch.zeros(shape, dtype=torch.bool, device=device)
        seen.index_put_(index, torch.ones((), dtype=torch.bool, device=device))
    if cnt:
        index = _flat_index([local[i] for i in cnt], [rows[i].output_ids for i in cnt], vocab_size, device)
        counts = torch.zeros(shape, dtype=torch.float32, device=device)  # exact below 2**24
        counts.index_put_(index, torch.ones((), dtype=torch.float32, device=device), accumulate=True)

    names = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    values = [[getattr(rows[i].params, name) for i in pen_rows] for name in names]
    repetition, presence, frequency = to_device(torch.tensor(values, dtype=torch.float32), device)
    all_rows = len(pen_rows) == len(rows)
    return _Penalties(
        rows=None if all_rows else to_device(torch.tensor(pen_rows, dtype=torch.int64), device),
        seen=seen,
        repetition=repetition,
        counts=counts,
        presence=presence,
        frequency=frequency,
    )


def _build_suppress(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    with_ids = [i for i, r in enumerate(rows) if len(r.suppress_ids)]
    if not with_ids:
        return None
    return _flat_index(with_ids, [rows[i].suppress_ids for i in with_ids], vocab_size, device)


def _build_offset(params: Sequence[SamplingParams], vocab_size: int, device: torch.device) -> _Offset | None:
    """The [R, V] offset of the rows with allowed_token_ids or logit_bias (a loop over rows and
    their ids, never over the vocabulary)."""
    used = [i for i, p in enumerate(params) if p.allowed_token_ids is not None or p.logit_bias]
    if not used:
        return None
    values = torch.zeros((len(used), vocab_size), dtype=torch.float32, device=device)
    restricted = [j for j, i in enumerate(used) if params[i].allowed_token_ids is not None]
    if restricted:
        # index_fill_ takes the value as a kernel argument; `values[idx] = x` would copy x to the device.
        values.index_fill_(0, to_device(torch.tensor(restricted, dtype=torch.int64), device), float("-inf"))
        allowed = [params[used[j]].allowed_token_ids or () for j in restricted]
        values.index_put_(_flat_index(restricted, allowed, vocab_size, device), torch.zeros((), device=device))
    biased = [j for j, i in enumerate(used) if params[i].logit_bias]
    if biased:
        ids = [list(params[used[j]].logit_bias) for j in biased]
        bias = torch.tensor([v for j in biased for v in params[used[j]].logit_bias.values()], dtype=torch.float32)
        values.index_put_(_flat_index(biased, ids, vocab_size, device), to_device(bias, device), accumulate=True)
    rows = None if len(used) == len(params) else to_device(torch.tensor(used, dtype=torch.int64), device)
    return _Offset(rows, values)


def _flat_index(
    row_ids: Sequence[int], seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ids) index pair for `tensor[rows, ids]`: row_ids[j] repeated once per id of seqs[j]."""
    ids = [_int64_tensor(s) for s in seqs]
    flat = torch.cat(ids)
    if flat.numel():
        low, high = torch.aminmax(flat)
        if int(low) < 0 or int(high) >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}) for the sampler")
    rows_and_lengths = to_device(torch.tensor([list(row_ids), [t.numel() for t in ids]], dtype=torch.int64), device)
    # Expanded on the device; output_size spares the device->host read of the total.
    row_index = torch.repeat_interleave(rows_and_lengths[0], rows_and_lengths[1], output_size=flat.numel())
    return row_index, to_device(flat, device)


def _int64_tensor(seq: Sequence[int]) -> torch.Tensor:
    """A 1-D int64 CPU tensor of the ids. Buffers (array, numpy) are copied, not viewed: a
    view would keep a request's growing array from being appended to while it lives."""
    if isinstance(seq, torch.Tensor):
        return seq.to(torch.int64).reshape(-1)
    return torch.from_numpy(np.array(seq, dtype=np.int64).reshape(-1))


_DRAW_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _mix32_tl(x):
        # lowbias32 on uint32: multiplies wrap mod 2**32 and shifts are logical, as in _mix32.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(
        x_ptr, seed_keys_ptr, steps_ptr, greedy_ptr, best_ptr, best_index_ptr, vocab_size, num_blocks,
        BLOCK: tl.constexpr,
    ):
        """One (row, block of the vocab) per program: the block's max of x + noise and where it is."""
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        inside = cols < vocab_size
        x = tl.load(x_ptr + row * vocab_size + cols, mask=inside, other=float("-inf"))
        # The row's keys as _noise_keys computes them; to(uint32) keeps the step's low 32 bits.
        key1 = _mix32_tl(tl.load(seed_keys_ptr + row).to(tl.uint32) ^ tl.load(steps_ptr + row).to(tl.uint32))
        key2 = _mix32_tl(key1 ^ 0x85EBCA6B)
        h = _mix32_tl(_mix32_tl(cols.to(tl.uint32) ^ key1) ^ key2)
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # * 2**-32, as in _gumbel_noise
        noise = -libdevice.log(-libdevice.log1p(-u))
        greedy = tl.load(greedy_ptr + row)
        y = tl.where(inside, tl.where(greedy, x, x + noise), float("-inf"))
        value, index = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(best_ptr + row * num_blocks + block, value)
        tl.store(best_index_ptr + row * num_blocks + block, block * BLOCK + index)


def _draw_triton(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows, vocab_size = x.shape
    num_blocks = triton.cdiv(vocab_size, _DRAW_BLOCK)
    best = torch.empty(rows, num_blocks, dtype=torch.float32, device=x.device)
    best_index = torch.empty(rows, num_blocks, dtype=torch.int64, device=x.device)
    _gumbel_argmax_kernel[(rows, num_blocks)](
        x, batch.seed_keys, batch.steps, batch.greedy, best, best_index, vocab_size, num_blocks,
        BLOCK=_DRAW_BLOCK, num_warps=8,
    )
    # The first block holding the row max: ties resolve to the lowest index, as torch.argmax does.
    return best_index.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)
