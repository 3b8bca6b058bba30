"""The request table's batched writes (ReqToTokenPool.write_many), on the CPU."""

from __future__ import annotations

from array import array

import pytest
import torch

from radixserve.model_runner.kv_pool import ReqToTokenPool


def _expected(rows: int, width: int, writes) -> torch.Tensor:
    table = torch.zeros((rows, width), dtype=torch.int64)
    for row, start, slots in writes:
        table[row, start : start + len(slots)] = torch.tensor(list(slots), dtype=torch.int64)
    return table


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
def test_write_many_matches_one_write_at_a_time(kind):
    """One-slot writes (a decode step) and long ones (prefill chunks, which take the
    buffer path), as arrays, lists and tuples, into rows out of order and at offsets."""
    g = torch.Generator().manual_seed(0)
    if kind == "decode":
        writes = [(r, int(torch.randint(0, 90, (1,), generator=g)), array("q", [1000 + r])) for r in range(12)]
    else:
        writes = [(7, 0, array("q", range(1, 301))), (2, 40, list(range(500, 560))), (5, 10, tuple(range(9, 99)))]
        if kind == "mixed":
            writes += [(0, 5, [4]), (1, 0, array("q")), (3, 2, array("q", [8, 9]))]
    pool = ReqToTokenPool(12, 400, "cpu")
    pool.write_many(writes)
    assert torch.equal(pool.table, _expected(12, 400, writes))


def test_write_past_the_context_is_an_error():
    pool = ReqToTokenPool(2, 64, "cpu")
    with pytest.raises(ValueError, match="request needs 70 positions, the table holds 64"):
        pool.write_many([(1, 40, list(range(30)))])
    assert not pool.table.any()
