"""Deterministic token content for hash-id traces, so an engine sees their prefix structure.

Token j of block ``b`` is a hash of (seed, b, j) mapped into ``[low, high)``:
the same id always gives the same block, a partial block is the first tokens
of its id's block, and two different ids agree on a token only by chance
(1 in ``high - low``). The range keeps clear of special tokens at either end of
common vocabularies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from radixserve.replay.formats import TraceRequest

DEFAULT_TOKEN_RANGE = (1000, 32000)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def block_tokens(
    block_id: int, n: int, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE, seed: int = 0
) -> np.ndarray:
    """The first ``n`` tokens of block ``block_id`` (int64)."""
    low, high = token_range
    base = _splitmix64(np.array([(block_id ^ (seed << 48)) & (2**64 - 1)], dtype=np.uint64))
    z = _splitmix64(base ^ np.arange(n, dtype=np.uint64))
    return (low + (z % np.uint64(high - low))).astype(np.int64)


def prompt_token_ids(req: TraceRequest, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE, seed: int = 0) -> list[int]:
    """The prompt of ``req``: its own token ids, or its blocks' deterministic tokens."""
    if req.input_ids is not None:
        return list(req.input_ids)
    return prompt_token_array(req, token_range, seed).tolist()


def prompt_token_array(
    req: TraceRequest, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE, seed: int = 0
) -> np.ndarray:
    """``prompt_token_ids`` as one int64 array (no Python int per token)."""
    if req.input_ids is not None:
        return np.array(req.input_ids, dtype=np.int64)
    B = req.block_size
    ids = req.hash_ids
    assert ids is not None, "a TraceRequest sets one of hash_ids and input_ids"
    parts = [block_tokens(b, B, token_range, seed) for b in ids[:-1]]
    parts.append(block_tokens(ids[-1], req.last_block_tokens, token_range, seed))
    return np.concatenate(parts)


def truncate(req: TraceRequest, max_tokens: int) -> TraceRequest:
    """``req`` cut to at most ``max_tokens`` prompt tokens, at a block boundary when
    that keeps any block (so a kept block is always whole, as in the trace)."""
    if req.input_length <= max_tokens:
        return req
    if req.input_ids is not None:
        return dataclasses.replace(req, input_ids=req.input_ids[:max_tokens], input_length=max_tokens)
    n = max_tokens // req.block_size
    if n == 0:
        raise ValueError(f"max prompt tokens {max_tokens} is below the block size {req.block_size}")
    assert req.hash_ids is not None, "a TraceRequest sets one of hash_ids and input_ids"
    return dataclasses.replace(req, hash_ids=req.hash_ids[:n], input_length=n * req.block_size)
