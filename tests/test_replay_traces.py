"""Mooncake traces at unlimited capacity, against an independent count.

The first 500 requests of each trace ship in tests/data (so these run everywhere);
the whole traces are checked too where ../shared/traces holds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.replay.formats import TraceReader
from radixserve.replay.simulate import RunSpec, SimOptions, simulate

DATA = Path(__file__).resolve().parent / "data"
FULL_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def independent_count(path: Path, block: int = 512) -> tuple[int, int, int]:
    """(hit tokens, prompt tokens, distinct cached tokens) of an unlimited prefix
    cache, counted with a set of prefixes: a prompt hits its longest prefix of
    whole blocks seen before, plus its partial last block if that same partial
    block (same id, same length) ended a seen prompt with the same prefix.
    A last block of exactly 512 tokens is an ordinary block."""
    seen: set[tuple] = set()
    hit = total = stored = 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ids, n = r["hash_ids"], r["input_length"]
            last = n - block * (len(ids) - 1)
            prefixes = [tuple(ids[: k + 1]) for k in range(len(ids))]
            if last < block:  # a partial block is only the same block at the same length
                prefixes[-1] = (*ids, "len", last)
            sizes = [block] * (len(ids) - 1) + [last]
            k = 0
            while k < len(prefixes) and prefixes[k] in seen:
                k += 1
            hit += sum(sizes[:k])
            stored += sum(sizes[k:])
            total += n
            seen.update(prefixes)
    return hit, total, stored


def check_unlimited_hit_rate(path: Path) -> None:
    reader = TraceReader(path)
    assert reader.format == "mooncake" and reader.block_size == 512
    result = simulate(lambda: iter(reader), [RunSpec("lru"), RunSpec("belady")], SimOptions())
    hit, total, stored = independent_count(path)
    assert 0 < hit < total  # the cut holds prefix hits (whole blocks and a partial last block)
    assert result.trace["prompt_tokens"] == total
    for run in result.runs:
        assert run["hit_tokens"] == hit, run["policy"]
        assert run["token_hit_rate"] == pytest.approx(hit / total)
        assert run["peak_cached_tokens"] == stored and run["evicted_tokens"] == 0
    assert reader.skipped == 0


@pytest.mark.parametrize("name", ["conversation_trace_500.jsonl", "synthetic_trace_500.jsonl"])
def test_trace_cut_unlimited_hit_rate(name: str) -> None:
    check_unlimited_hit_rate(DATA / name)


@pytest.mark.parametrize("name", ["conversation_trace.jsonl", "synthetic_trace.jsonl"])
def test_full_trace_unlimited_hit_rate(name: str) -> None:
    path = FULL_TRACES / name
    if not path.is_file():
        pytest.skip(f"{path} not present (the first 500 requests are checked from tests/data)")
    check_unlimited_hit_rate(path)
