"""Torch's threads per forward on the CPU (model_runner/cpu_threads.py): every usable CPU for
steps of many rows, one left to the host below, OMP_NUM_THREADS pinning every step; the count
set in the thread that runs the forward; the same greedy tokens whatever the count."""

from __future__ import annotations

import threading

import pytest
import torch

from radixserve import SamplingParams
from radixserve.model_runner import cpu_threads
from radixserve.model_runner.cpu_threads import WIDE_STEP_ROWS, StepThreads


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The engines built here set this thread's torch count (configure_cpu_threads): put it back."""
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 4)


def in_fresh_thread(fn):
    """fn() in a new thread (its torch thread count is its own), its result and that thread's count after."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append((fn(), torch.get_num_threads())))
    thread.start()
    thread.join()
    return out[0]


def test_wide_steps_take_every_cpu_and_narrow_ones_leave_one(four_cpus):
    threads = StepThreads()
    assert threads.enabled
    assert threads.threads_for(WIDE_STEP_ROWS) == threads.threads_for(10 * WIDE_STEP_ROWS) == 4
    assert threads.threads_for(WIDE_STEP_ROWS - 1) == threads.threads_for(1) == 3


def test_apply_sets_the_count_of_the_calling_thread_only(four_cpus):
    main_count = torch.get_num_threads()
    threads = StepThreads()
    assert in_fresh_thread(lambda: threads.apply(WIDE_STEP_ROWS)) == (4, 4)
    assert in_fresh_thread(lambda: threads.apply(1)) == (3, 3)
    assert torch.get_num_threads() == main_count


def test_omp_num_threads_pins_every_step(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 4)
    threads = StepThreads()
    assert not threads.enabled

    def both():
        torch.set_num_threads(1)
        return threads.apply(WIDE_STEP_ROWS), threads.apply(1)

    assert in_fresh_thread(both) == ((1, 1), 1)


def test_engine_steps_run_on_their_thread_counts_with_the_same_tokens(qwen3_d64, make_engine, monkeypatch):
    """A prefill of more than WIDE_STEP_ROWS rows runs on two threads, its decodes on one, in the
    engine's thread; the greedy tokens equal transformers' and those of an engine whose every
    step runs on one thread."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (WIDE_STEP_ROWS + 40, 30)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def run(engine) -> tuple[list[list[int]], set[tuple[bool, int]]]:
        runner = engine.core.runner
        forward, seen = runner.model.forward, set()

        def spy(input_ids, *args, **kwargs):
            seen.add((input_ids.shape[0] >= WIDE_STEP_ROWS, torch.get_num_threads()))
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(runner.model, "forward", spy)
        outs = engine.generate(prompts, params, progress=False)
        return [o.token_ids for o in outs], seen

    stepped, seen = run(make_engine(qwen3_d64, max_running_requests=4))
    assert seen == {(True, 2), (False, 1)}
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 1)
    one, seen_one = run(make_engine(qwen3_d64, max_running_requests=4))
    assert seen_one == {(True, 1), (False, 1)}
    assert stepped == one
    hf = AutoModelForCausalLM.from_pretrained(str(qwen3_d64), dtype=torch.float32).eval()
    for ids, got in zip(prompts, stepped):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(ids):].tolist()
