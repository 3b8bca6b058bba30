"""The CUDA graph runners' parts that need no GPU (model_runner/graphs/): the options'
checks, the decode graph's inputs as staged on the host, the piece buckets. Their GPU
tests are tests/gpu/test_gpu_graphs.py and tests/gpu/test_gpu_piecewise.py."""

from __future__ import annotations

import pytest

from radixserve import Engine, SamplingParams
from radixserve.model_runner.graphs.piecewise import piecewise_buckets
from radixserve.model_runner.model_runner import ModelRunner

# -- decode graphs ---------------------------------------------------------------------------------


def test_cuda_graphs_on_cpu_is_a_value_error(tiny_qwen3_path):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine(str(tiny_qwen3_path), device="cpu", cuda_graphs=True, show_progress=False)


@pytest.mark.parametrize("overlap", [False, True])
def test_staged_graph_inputs_are_the_batch_then_padding(tiny_qwen3_path, monkeypatch, overlap):
    """The graph's input block is staged on the host (no GPU needed): for every decode batch
    the scheduler builds (cache hits, folding, arrivals, cascade plans), the batch's columns,
    its sequence lengths among them, then padding rows; a cascade block then holds each
    sequence's shared length and, per group padded to the bucket, its first query row, a
    member's request row and its prefix length."""
    import random

    import numpy as np
    from test_engine_cache import run_core, shared_prefix_prompts

    from radixserve.model_runner.graphs.decode import _stage_groups, stage_inputs

    staged = {"plain": 0, "cascade": 0}
    forward = ModelRunner.forward

    def stage_then_forward(self, batch):
        if batch.is_decode:
            n, bs = batch.batch_size, batch.batch_size + 3
            host = np.full((5, bs), -1, dtype=np.int64)
            stage_inputs(host, batch)
            columns = [batch.input_ids, batch.positions, batch.out_slots, batch.req_rows, batch.seq_lens]
            assert host[:, :n].tolist() == [list(map(int, c)) for c in columns]
            assert host[:, n:].tolist() == [[0] * 3] * 4 + [[1] * 3]
            plan = batch.cascade
            staged["plain" if plan is None else "cascade"] += 1
            if plan is not None:
                block = np.full(4 * bs + 1, -1, dtype=np.int64)
                _stage_groups(block, batch, bs)
                shared, cu_q, rows, prefix = np.split(block, [bs, 2 * bs + 1, 3 * bs + 1])
                g = len(plan.group_sizes)
                assert shared.tolist() == plan.shared_lens + [0] * 3
                assert cu_q.tolist() == np.cumsum([0, *plan.group_sizes]).tolist() + [bs] * (bs - g)
                assert rows[:g].tolist() == [batch.req_rows[i] for i in cu_q[:g]] and not rows[g:].any()
                assert prefix.tolist() == plan.prefix_lens + [0] * (bs - g)
        return forward(self, batch)

    monkeypatch.setattr(ModelRunner, "forward", stage_then_forward)
    rng = random.Random(4)
    prompts = shared_prefix_prompts(rng, 10)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    run_core(tiny_qwen3_path, prompts, params, arrivals=[rng.randrange(0, 8) for _ in prompts],
             overlap_schedule=overlap, cascade_attention=True, cascade_min_prefix=4)
    assert staged["plain"] > 2 and staged["cascade"] > 2, staged


# -- piecewise graphs ------------------------------------------------------------------------------


def test_piecewise_graphs_option_is_checked(tiny_qwen3_path):
    with pytest.raises(ValueError, match="piecewise_graphs must be None"):
        Engine(str(tiny_qwen3_path), device="cpu", piecewise_graphs="yes", show_progress=False)
    with pytest.raises(ValueError, match="piecewise_graphs=True: cuda_graphs needs a CUDA device"):
        Engine(str(tiny_qwen3_path), device="cpu", piecewise_graphs=True, show_progress=False)
    for bad in (0, -5, 2.5, "8192"):
        with pytest.raises(ValueError, match="piecewise_max_rows"):
            Engine(str(tiny_qwen3_path), device="cpu", piecewise_max_rows=bad, show_progress=False)


def test_cpu_engine_runs_no_pieces(tiny_qwen3_path):
    engine = Engine(str(tiny_qwen3_path), device="cpu", show_progress=False)
    try:
        assert engine.core.runner.pieces is None
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), progress=False)
        assert engine.stats()["piecewise_steps"] == 0
    finally:
        engine.shutdown()


def test_buckets_cover_every_row_count_up_to_the_largest():
    assert piecewise_buckets(100) == [16, 32, 64, 100]
    assert piecewise_buckets(16) == [16]
    assert piecewise_buckets(5) == [5]
    buckets = piecewise_buckets(16384 + 256)
    assert buckets[-1] == 16640 and buckets == sorted(set(buckets))
    # Padding stays under 25% of a bucket past 1,024 rows.
    assert all(b / a <= 1.25 for a, b in zip(buckets, buckets[1:]) if a >= 1024)
