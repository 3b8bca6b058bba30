"""The Engine's public API: validation, finish reasons, stops, seeds, streaming, asyncio, abort."""

from __future__ import annotations

import asyncio

import pytest

from radixserve import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def idle_and_empty(engine) -> None:
    assert engine.wait_idle(30)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", None, "prompt"),
        ([], None, "prompt"),
        ([1, 2, -3], None, "prompt"),
        ([1, 2, 10**9], None, "prompt"),
        ([1, 2.5], None, "prompt"),
        ([1, True], None, "prompt"),  # bool is an int subclass, not a token id
        ("x " * 9000, None, "prompt"),
        ("hello", "not params", "params"),
    ],
)
def test_bad_prompts_raise_and_engine_keeps_serving(smollm_engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        smollm_engine.generate([prompt], params, progress=False)
    idle_and_empty(smollm_engine)
    out = smollm_engine.generate(["Hi"], SamplingParams(max_tokens=2, temperature=0), progress=False)[0]
    assert len(out.token_ids) >= 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_a_bad_prompt_in_a_list_enqueues_nothing(smollm_engine):
    before = smollm_engine.stats()["prompt_tokens"]
    with pytest.raises(ValueError):
        smollm_engine.generate(["fine", ""], GREEDY, progress=False)
    assert smollm_engine.stats()["prompt_tokens"] == before
    idle_and_empty(smollm_engine)


def test_params_list_length_must_match(smollm_engine):
    with pytest.raises(ValueError, match="params"):
        smollm_engine.generate(["a", "b"], [GREEDY], progress=False)


def test_unknown_engine_option_is_an_error(tiny_qwen3_path):
    with pytest.raises(ValueError, match="max_runing_requests"):
        Engine(str(tiny_qwen3_path), device="cpu", max_runing_requests=4)
    with pytest.raises(ValueError, match="eviction_policy"):
        Engine(str(tiny_qwen3_path), device="cpu", eviction_policy="random")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        Engine(str(tmp_path / "nope"), device="cpu")


def test_max_tokens_and_length_finish(smollm_engine):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    out = smollm_engine.generate(["Count: 1, 2, 3,"], params, progress=False)[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"


def test_stop_token_ids_end_generation(smollm_engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    free = smollm_engine.generate(["Count: 1, 2, 3,"], params, progress=False)[0]
    target = free.token_ids[3]
    first = free.token_ids.index(target)
    out = smollm_engine.generate(["Count: 1, 2, 3,"], params.replace(stop_token_ids=[target]), progress=False)[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == target


def test_stop_string_truncates_text(smollm_engine):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = smollm_engine.generate(["Count: 1, 2, 3,"], params, progress=False)[0]
    stop = free.text[5:8]
    assert stop.strip()
    out = smollm_engine.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]), progress=False
    )[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    kept = smollm_engine.generate(
        ["Count: 1, 2, 3,"],
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        progress=False,
    )[0]
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]


def test_stop_strings_wait_for_min_tokens(smollm_engine):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = smollm_engine.generate(["Count: 1, 2, 3,"], params, progress=False)[0]
    stop = free.text[2:5]
    early = smollm_engine.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]), progress=False
    )[0]
    late = smollm_engine.generate(
        ["Count: 1, 2, 3,"],
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], min_tokens=len(early.token_ids) + 2),
        progress=False,
    )[0]
    assert len(late.token_ids) >= len(early.token_ids) + 2
    assert late.text.startswith(free.text[:5])  # the early stop string was not honoured
    assert free.token_ids[: len(late.token_ids)] == late.token_ids


def test_eos_stops_unless_ignored_and_min_tokens(smollm_engine):
    eos = smollm_engine.tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = smollm_engine.chat(msgs, SamplingParams(max_tokens=64, temperature=0))
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    n = len(out.token_ids)
    longer = smollm_engine.chat(msgs, SamplingParams(max_tokens=64, temperature=0, min_tokens=n + 3))
    assert len(longer.token_ids) >= n + 3
    assert eos not in longer.token_ids[: n + 3]
    ignored = smollm_engine.chat(msgs, SamplingParams(max_tokens=n + 4, temperature=0, ignore_eos=True))
    assert len(ignored.token_ids) == n + 4 and ignored.finish_reason == "length"


def test_seed_reproduces_whatever_the_batch(smollm_engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    alone = smollm_engine.generate(["Tell me a story"], p, progress=False)[0]
    others = SamplingParams(max_tokens=7, temperature=1.3, ignore_eos=True)
    mixed = smollm_engine.generate(["Hello there", "Tell me a story", "Why?"], [others, p, others], progress=False)
    assert mixed[1].token_ids == alone.token_ids
    other_seed = smollm_engine.generate(["Tell me a story"], p.replace(seed=43), progress=False)[0]
    assert other_seed.token_ids != alone.token_ids


def test_streaming_deltas_add_up(smollm_engine):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    whole = smollm_engine.generate(["The sky is"], params, progress=False)[0]
    deltas = list(smollm_engine.stream("The sky is", params))
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_closing_a_stream_aborts_and_frees(smollm_engine):
    it = smollm_engine.stream("Write a long essay about the sea.", SamplingParams(max_tokens=200, ignore_eos=True))
    next(it)
    next(it)
    it.close()
    idle_and_empty(smollm_engine)


def test_abort_by_request_id(smollm_engine):
    it = smollm_engine.stream("Write a long essay about the sea.", SamplingParams(max_tokens=200, ignore_eos=True))
    first = next(it)
    smollm_engine.abort(first.request_id)
    rest = list(it)
    assert rest and rest[-1].finish_reason == "abort"
    idle_and_empty(smollm_engine)


def test_async_generation_and_cancellation(smollm_engine):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    whole = smollm_engine.generate(["Paris is"], params, progress=False)[0]

    async def collect() -> list:
        return [d async for d in smollm_engine.generate_async("Paris is", params)]

    async def cancel_early() -> None:
        agen = smollm_engine.generate_async("Paris is", SamplingParams(max_tokens=300, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()

    deltas = asyncio.run(collect())
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].cached_tokens > 0  # the same prompt ran just before
    asyncio.run(cancel_early())
    idle_and_empty(smollm_engine)


def test_repeated_prompt_reports_cached_tokens(smollm_engine):
    prompt = "A fairly long shared system prompt about helpful answers. Question: what is 1+1?"
    a = smollm_engine.generate([prompt], GREEDY, progress=False)[0]
    b = smollm_engine.generate([prompt], GREEDY, progress=False)[0]
    assert a.cached_tokens == 0
    assert b.cached_tokens == len(b.prompt_token_ids) - 1
    assert a.token_ids == b.token_ids
    stats = smollm_engine.stats()
    assert stats["hit_tokens"] >= b.cached_tokens


def test_flush_cache_empties_the_tree(smollm_engine):
    smollm_engine.generate(["Something to cache"], GREEDY, progress=False)
    assert smollm_engine.stats()["cache_tokens"] > 0
    assert smollm_engine.flush_cache()
    assert smollm_engine.stats()["cache_tokens"] == 0


def test_logprobs_shape(smollm_engine):
    params = SamplingParams(max_tokens=4, temperature=0.7, seed=1, logprobs=5, ignore_eos=True)
    out = smollm_engine.generate(["Hello"], params, progress=False)[0]
    assert len(out.logprobs) == 4
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0.0
        assert len(lp.top) == 5
        assert any(t == tok for t, _ in lp.top) or lp.logprob <= lp.top[-1][1]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"fold_mode": "both"}, "fold_mode"),
        ({"fold_threshold": 0.0}, "fold_threshold"),
        ({"fold_threshold": 1.5}, "fold_threshold"),
        ({"fold_mode": "tree", "page_size": 4}, "page_size"),
        ({"moe_backend": "cuda"}, "moe_backend"),
        ({"max_running_requests": 0}, "max_running_requests"),
        ({"kv_cache_tokens": -5}, "kv_cache_tokens"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"schedule_policy": "sjf"}, "schedule_policy"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_engine_options_name_the_field(options, field):
    from radixserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match=field):
        EngineConfig.from_kwargs(**options)


def test_fold_mode_follows_page_size_by_default():
    from radixserve.engine.config import EngineConfig

    assert EngineConfig().fold_mode == "tree"
    assert EngineConfig(page_size=4).fold_mode == "mlp"


@pytest.mark.parametrize("show", [True, False])
def test_show_progress_controls_the_load_bar(tiny_qwen3_path, capfd, show):
    with Engine(str(tiny_qwen3_path), device="cpu", show_progress=show):
        pass
    err = capfd.readouterr().err
    assert ("Loading weights" in err) == show


def test_shutdown_releases_the_kv_pool_and_refuses_new_work(tiny_qwen3_path):
    engine = Engine(str(tiny_qwen3_path), device="cpu", show_progress=False)
    engine.generate([[1, 2, 3]], GREEDY, progress=False)
    engine.shutdown()
    assert engine.core.runner.pool.k == [] and engine.core.runner.model is None
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([[1, 2, 3]], GREEDY, progress=False)
    engine.shutdown()  # idempotent
