"""Piecewise CUDA graphs for prefill and mixed steps (model_runner/graphs/piecewise.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.runner import make_runner
from helpers.tiny_models import runner_batch

from radixserve import SamplingParams
from radixserve.model_runner.forward_batch import CascadePlan, ForwardBatch
from radixserve.model_runner.model_runner import ModelRunner

gpu = pytest.mark.gpu
GPU = dict(device="cuda", dtype="bfloat16", kv_cache_tokens=8192)


# -- runner level: logits of padded pieces against the eager forward -------------------------------


def _runner(path, pieces: bool, **options) -> ModelRunner:
    return make_runner(path, max_running_requests=24, kv_cache_tokens=32768, gpu_memory_utilization=0.9,
                       attention_backend="fa4", cuda_graphs=False, piecewise_graphs=pieces, max_prefill_tokens=1000,
                       **options)


@gpu
def test_piecewise_max_rows_bounds_the_captured_steps(needs_fa4, qwen3_d64):
    """`piecewise_max_rows` caps the buckets; a step of more rows runs eagerly, one at the
    cap replays the pieces, and both match the eager runner."""
    eager, capped = _runner(qwen3_d64, False), _runner(qwen3_d64, True, piecewise_max_rows=64)
    assert capped.pieces.buckets == [16, 32, 64]
    g = torch.Generator().manual_seed(3)
    for row, n, replayed in ((0, 64, 1), (1, 65, 0)):
        tokens = [torch.randint(0, 500, (n,), generator=g)]
        before = capped.piecewise_batches
        got, want = (r.forward(runner_batch(r, [row], [0], tokens)).logits.float().cpu() for r in (capped, eager))
        assert capped.piecewise_batches - before == replayed
        _close(got, want, f"{n} rows")


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    err = float((got - want).norm() / want.norm())
    assert err < 1e-2, f"{what}: logits relative error {err:.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9, what


@gpu
def test_piecewise_logits_match_eager(needs_fa4, qwen3_d64):
    """Fresh prefills, chunks over cached prefixes, mixed steps of chunks and decodes, a
    cascade plan, and a step past the largest bucket (eager): every row count padded up to
    a bucket but the exact ones, through a runner with pieces and one without."""
    eager, pieces = _runner(qwen3_d64, False), _runner(qwen3_d64, True)
    assert eager.pieces is None and pieces.pieces is not None
    assert pieces.pieces.max_rows == 1024
    g = torch.Generator().manual_seed(7)
    kv: dict[int, int] = {}

    def step(rows: list[int], lens: list[int], plan: CascadePlan | None = None, what: str = "") -> None:
        tokens = [torch.randint(0, 500, (n,), generator=g) for n in lens]
        starts = [kv.get(r, 0) for r in rows]
        outs = []
        for runner in (eager, pieces):
            batch = runner_batch(runner, rows, starts, tokens)
            batch.cascade = plan
            outs.append(runner.forward(batch).logits.float().cpu())
        _close(outs[1], outs[0], what)
        for r, n in zip(rows, lens):
            kv[r] = kv.get(r, 0) + n

    step([0, 1, 2], [37, 200, 64], what="fresh prefills (301 rows)")
    step([3], [16], what="one sequence of 16 rows (a bucket exactly)")
    step([0, 1, 2], [90, 1, 300], what="chunks over cached prefixes and a decode")
    step([4, 5, 6, 7], [700, 1, 1, 1], what="a chunk with decodes of fresh rows")
    before = pieces.piecewise_batches
    step([8, 9], [800, 400], what="1,200 rows: past the largest bucket, eager")
    assert pieces.piecewise_batches == before
    # Sequences 10..13 share sequence 0's first 300 slots (as cached prefixes do).
    for runner in (eager, pieces):
        for r in (10, 11, 12, 13):
            runner.req_to_token.table[r, :300] = runner.req_to_token.table[0, :300]
    for r in (10, 11, 12, 13):
        kv[r] = 300
    step([10, 11, 12, 13, 1], [20, 5, 1, 9, 1], CascadePlan([4, 1], [300, 0]), what="a cascade mixed step")
    assert pieces.piecewise_batches == before + 1


# -- engine level -------------------------------------------------------------------------------------


def _prompts(n: int, seed: int, stem: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 250, (stem,), generator=g).tolist()
    return [shared + torch.randint(0, 250, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 100, (n,), generator=g)]


@gpu
@pytest.mark.parametrize("fold_mode", ["tree", "mlp"])
def test_piecewise_engine_greedy_tokens_equal_eager(needs_fa4, tiny_qwen3_path, make_engine, fold_mode):
    """Chunked prefills mixed with decodes (a small prefill budget, arrivals in rounds),
    requests sharing a stem (cache hits, folding, cascade): tokens with pieces equal the
    fully eager prefill's; every request's logprobs too, to bf16 rounding."""
    opts = dict(GPU, max_running_requests=16, max_prefill_tokens=256, fold_mode=fold_mode, cascade_min_prefix=64)
    eager = make_engine(tiny_qwen3_path, piecewise_graphs=False, **opts)
    pieces = make_engine(tiny_qwen3_path, **opts)
    assert pieces.core.runner.pieces is not None and eager.core.runner.pieces is None
    rounds = [_prompts(10, 1, stem=120), _prompts(6, 2), _prompts(10, 1, stem=120)[:4] + _prompts(8, 3, stem=90)]
    for prompts in rounds:
        params = [SamplingParams(max_tokens=3 + 5 * (i % 4), temperature=0.0, ignore_eos=True, logprobs=0)
                  for i in range(len(prompts))]
        want = eager.generate(prompts, params, progress=False)
        got = pieces.generate(prompts, params, progress=False)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for a, b in zip(got, want):
            diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)]
            assert max(diffs) < 0.05, diffs
    stats = pieces.stats()
    assert stats["piecewise_steps"] > 5 and eager.stats()["piecewise_steps"] == 0
    assert stats["hit_tokens"] > 0


@gpu
def test_host_copies_do_not_wait_for_the_gpu():
    """A step's inputs and attention metadata reach the device through pinned memory: with
    the GPU busy (a queued ~1 s spin), moving a batch and building its metadata return while
    the stream is still running (a copy from pageable memory would wait for it), and the
    copies land intact."""
    from radixserve.model_runner.attention.metadata import build_varlen_metadata

    n = 1000
    batch = ForwardBatch(
        input_ids=torch.arange(n), positions=torch.arange(n), out_slots=torch.arange(1, n + 1),
        req_rows=[0, 1], prefix_lens=[0, 0], extend_lens=[600, 400], logits_rows=torch.tensor([599, 999]),
    )
    table = torch.zeros((4, 2048), dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # cycles: ~1 s at H100 clocks
    moved = batch.to(torch.device("cuda"))
    meta = build_varlen_metadata(batch, table)
    assert not torch.cuda.current_stream().query(), "the host waited for the GPU"
    torch.cuda.synchronize()
    assert torch.equal(moved.input_ids.cpu(), batch.input_ids)
    assert torch.equal(moved.logits_rows.cpu(), batch.logits_rows)
    assert meta.cu_seqlens_q.tolist() == [0, 600, 1000] and meta.seqused_k.tolist() == [600, 400]
