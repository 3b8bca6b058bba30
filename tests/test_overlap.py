"""Overlapped scheduling (EngineCore.step with overlap_schedule): the next decode step is
built and launched before the previous one is processed. Tokens, logprobs and finish
reasons must equal the sequential engine's in every case; the slot invariants are checked
after every step (run_core) and every engine is leak-checked.

Either way, a step that samples the same requests as the last one moves the last sampling
tensors a step on instead of building them (EngineCore._sampling_batch); the
`sampling_checks` fixture compares them with a build at every step."""

from __future__ import annotations

import random

import pytest
from test_engine_cache import run_core, shared_prefix_prompts
from test_sampler import assert_same_sampling_batch

from radixserve import SamplingParams


@pytest.fixture
def sampling_checks(monkeypatch):
    """Check each step's sampling tensors against a build from the step's rows; count the
    steps that moved the last tensors on ("moved"; "subset" of them for other requests than
    the last step's) and those that built them ("built")."""
    from radixserve.engine.core import EngineCore
    from radixserve.model_runner.sampler import SamplingBatch
    from radixserve.scheduler.scheduler import Scheduler

    counts = {"moved": 0, "subset": 0, "built": 0}
    builds = []
    sampling_rows = Scheduler.sampling_rows
    sampling_batch = EngineCore._sampling_batch

    def counted_rows(self, batch):
        builds.append(batch)
        return sampling_rows(self, batch)

    def checked(self, batch):
        before = len(builds)
        same = self._last_sampling is not None and self._last_sampling.reqs == batch.sample_reqs
        got = sampling_batch(self, batch)
        built = len(builds) > before
        counts["built" if built else "moved"] += 1
        counts["subset"] += not built and not same
        fresh = SamplingBatch.build(sampling_rows(self, batch), self.runner.vocab_size, self.device)
        assert_same_sampling_batch(got, fresh)
        return got

    monkeypatch.setattr(Scheduler, "sampling_rows", counted_rows)
    monkeypatch.setattr(EngineCore, "_sampling_batch", checked)
    return counts


def _rounded_logprobs(req):
    return [(t, round(lp, 5)) for t, lp, _ in req.output_logprobs]


def _run(path, prompts, params, on_ahead=None, **options):
    """run_core, counting the steps that were scheduled ahead; on_ahead(scheduler, batch)
    sees each one."""
    from radixserve.scheduler.scheduler import Scheduler

    calls = {"ahead": 0}
    original = Scheduler.schedule_ahead

    def counted(self, prev):
        calls["ahead"] += 1
        batch = original(self, prev)
        if on_ahead is not None:
            on_ahead(self, batch)
        return batch

    Scheduler.schedule_ahead = counted
    try:
        outputs, core, reqs = run_core(path, prompts, params, **options)
    finally:
        Scheduler.schedule_ahead = original
    return outputs, reqs, calls["ahead"]


@pytest.mark.parametrize("seed", [0, 1])
def test_overlap_matches_sequential_with_arrivals_and_sampling(tiny_qwen3_path, seed, sampling_checks):
    rng = random.Random(seed)
    prompts = shared_prefix_prompts(rng, 14)
    params = [
        SamplingParams(max_tokens=rng.randrange(1, 14), temperature=rng.choice([0.0, 0.9]), top_k=rng.choice([0, 20]),
                       ignore_eos=True, logprobs=2)
        for _ in prompts
    ]
    arrivals = [rng.randrange(0, 25) for _ in prompts]
    want, want_reqs, _ = _run(tiny_qwen3_path, prompts, params, arrivals=arrivals, overlap_schedule=False)
    got, got_reqs, ahead = _run(tiny_qwen3_path, prompts, params, arrivals=arrivals, overlap_schedule=True)
    assert ahead > 5, "no step was scheduled ahead"
    assert sampling_checks["moved"] > 5 and sampling_checks["subset"] > 2 and sampling_checks["built"] > 5
    assert got == want
    for a, b in zip(got_reqs, want_reqs):
        assert a.finish_reason == b.finish_reason
        assert _rounded_logprobs(a) == _rounded_logprobs(b)


@pytest.mark.parametrize("options", [
    dict(),  # prefix cache and tree folding on
    dict(enable_prefix_cache=False, fold_mode="tree"),  # fold families, no cache
    dict(fold_mode="mlp", cascade_attention=True, cascade_min_prefix=8),
])
def test_mixed_steps_overlap_and_match_sequential(tiny_qwen3_path, sampling_checks, options):
    """Steps with prefill chunks overlap too: the next step (chunks read on the host, the
    tokens just sampled read on the device, new requests admitted against a tree that
    already holds the in-flight chunks) is built before the last is processed."""
    rng = random.Random(11)
    stem = [rng.randrange(1, 500) for _ in range(40)]
    prompts = [stem[: rng.randrange(10, 41)] + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 30))]
               for _ in range(14)]
    params = [SamplingParams(max_tokens=rng.randrange(2, 12), temperature=rng.choice([0.0, 0.8]), ignore_eos=True,
                             logprobs=1)
              for _ in prompts]
    arrivals = [rng.randrange(0, 20) for _ in prompts]
    mixed = []

    def note_mixed(scheduler, batch):
        if batch is not None and batch.ahead and any(n > 1 for n in batch.extend_lens):
            mixed.append((len(batch.ahead), batch.forward.num_tokens, len(batch.reqs)))

    run = dict(arrivals=arrivals, max_prefill_tokens=24, **options)
    want, want_reqs, _ = _run(tiny_qwen3_path, prompts, params, overlap_schedule=False, **run)
    got, got_reqs, _ = _run(tiny_qwen3_path, prompts, params, note_mixed, overlap_schedule=True, **run)
    assert len(mixed) > 5, mixed  # chunks and decodes of sampled tokens in one step built ahead
    assert got == want
    for a, b in zip(got_reqs, want_reqs):
        assert a.finish_reason == b.finish_reason and a.cached_tokens == b.cached_tokens
        assert _rounded_logprobs(a) == _rounded_logprobs(b)


def test_overlap_with_stop_tokens_wastes_one_step_and_changes_nothing(tiny_qwen3_path, sampling_checks):
    """A stop token is seen one step late: the request decodes once more, that token is
    dropped, and its slot goes back with the rest."""
    rng = random.Random(3)
    prompts = shared_prefix_prompts(rng, 10)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    plain, _, _ = _run(tiny_qwen3_path, prompts, greedy, overlap_schedule=False)
    # Stop on tokens the greedy runs produce mid-way, so requests end at different steps.
    stops = sorted({out[len(out) // 2] for out in plain if len(out) > 2})[:4]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=stops)
    want, want_reqs, _ = _run(tiny_qwen3_path, prompts, params, overlap_schedule=False)
    got, got_reqs, ahead = _run(tiny_qwen3_path, prompts, params, overlap_schedule=True)
    assert ahead > 5
    assert got == want
    assert any(r.finish_reason == "stop" for r in got_reqs)
    assert [(r.finish_reason, r.stop_reason) for r in got_reqs] == [(r.finish_reason, r.stop_reason) for r in want_reqs]


def test_overlap_falls_back_for_penalties_min_tokens_and_retraction(tiny_qwen3_path, sampling_checks):
    """Requests whose sampling needs their latest token, and a pool small enough to
    retract, run sequentially where needed and give the same tokens."""
    rng = random.Random(5)
    prompts = shared_prefix_prompts(rng, 12)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                       repetition_penalty=1.3 if i % 3 == 0 else 1.0, min_tokens=8 if i % 3 == 1 else 0)
        for i in range(len(prompts))
    ]
    small = dict(kv_cache_tokens=180, max_prefill_tokens=48)
    want, _, _ = _run(tiny_qwen3_path, prompts, params, overlap_schedule=False, **small)
    got, _, _ = _run(tiny_qwen3_path, prompts, params, overlap_schedule=True, **small)
    assert got == want


def test_engine_with_overlap_streams_aborts_and_matches(tiny_qwen3_path, make_engine, sampling_checks):
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 1, 2, 3], [11, 12], [5, 6, 7, 8, 9, 10, 11]]
    params = [SamplingParams(max_tokens=3 + 4 * i, temperature=0.7, seed=i, ignore_eos=True) for i in range(4)]
    sequential = make_engine(tiny_qwen3_path, overlap_schedule=False)
    overlapped = make_engine(tiny_qwen3_path, overlap_schedule=True)
    assert overlapped.core.overlap and not sequential.core.overlap
    want = [o.token_ids for o in sequential.generate(prompts, params, progress=False)]
    got = [o.token_ids for o in overlapped.generate(prompts, params, progress=False)]
    assert got == want
    # A stream left early aborts its request mid-run; the engine keeps serving.
    stream = overlapped.stream(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    again = [o.token_ids for o in overlapped.generate(prompts, params, progress=False)]
    assert again == want
    assert overlapped.stats()["generated_tokens"] >= sum(len(t) for t in want) * 2


def test_overlap_runs_with_a_backlog_when_every_row_is_taken(tiny_qwen3_path):
    """A queue longer than max_running_requests: decode steps still overlap while nothing
    can be admitted (a request ending by length stops the overlap so the next one is
    admitted at once); tokens and finish reasons equal the sequential run's."""
    rng = random.Random(7)
    prompts = shared_prefix_prompts(rng, 9)
    params = [SamplingParams(max_tokens=rng.randrange(4, 16), temperature=0.8, ignore_eos=True) for _ in prompts]
    waiting_when_ahead = []
    small = dict(max_running_requests=3)
    want, want_reqs, _ = _run(tiny_qwen3_path, prompts, params, overlap_schedule=False, **small)
    got, got_reqs, _ = _run(tiny_qwen3_path, prompts, params, lambda s, _: waiting_when_ahead.append(len(s.waiting)),
                            overlap_schedule=True, **small)
    assert got == want
    assert [r.finish_reason for r in got_reqs] == [r.finish_reason for r in want_reqs]
    assert sum(1 for n in waiting_when_ahead if n > 0) > 5, waiting_when_ahead


@pytest.mark.parametrize("overlap", [False, True])
def test_sampling_tensors_move_on_only_while_the_sampled_requests_stay(tiny_qwen3_path, sampling_checks, monkeypatch,
                                                                      overlap):
    """Requests arrive with other params, finish, stop on tokens, are aborted and retracted;
    some with penalties or min_tokens join mid-run. Each step's tensors equal a build (the
    fixture), and the tokens equal those of a run that builds every step."""
    from radixserve.model_runner.sampler import SamplingBatch

    rng = random.Random(9)
    prompts = shared_prefix_prompts(rng, 12)
    params = [
        SamplingParams(max_tokens=rng.randrange(12, 30), temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]),
                       ignore_eos=True, logprobs=1 if i % 4 == 0 else None,
                       stop_token_ids=[175, 13, 326] if i % 3 == 0 else [],  # tokens this model often draws
                       repetition_penalty=1.3 if i == 6 else 1.0, min_tokens=5 if i == 9 else 0)
        for i in range(len(prompts))
    ]
    options = dict(arrivals=[0, 0, 0, 1, 2, 3, 8, 9, 9, 12, 14, 20], aborts={6: "r2", 11: "r5"}, kv_cache_tokens=90,
                   max_prefill_tokens=16, overlap_schedule=overlap)
    got, core, got_reqs = run_core(tiny_qwen3_path, prompts, params, **options)
    assert core.stats()["retractions"] > 0
    assert {"stop", "abort", "length"} == {r.finish_reason for r in got_reqs}
    assert sampling_checks["moved"] > 10 and sampling_checks["subset"] > 2 and sampling_checks["built"] > 5
    monkeypatch.setattr(SamplingBatch, "next_step", lambda self, keep=None: None)
    want, _, want_reqs = run_core(tiny_qwen3_path, prompts, params, **options)
    assert got == want
    for a, b in zip(got_reqs, want_reqs):
        assert (a.finish_reason, a.output_logprobs) == (b.finish_reason, b.output_logprobs)
    assert [r.finish_reason for r in got_reqs].count("abort") == 2


def test_overlap_option_is_checked(tiny_qwen3_path):
    from radixserve import Engine

    with pytest.raises(ValueError, match="overlap_schedule"):
        Engine(str(tiny_qwen3_path), device="cpu", overlap_schedule="on", show_progress=False)
