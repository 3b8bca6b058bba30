"""The HTTP server through the official `openai` client, unchanged, plus the native and operational routes.

A real server on a loopback port (background thread) over a CPU SmolLM2 engine;
outputs are checked against the engine called directly, so the HTTP layer can
neither drop nor reorder anything without a test failing.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

openai = pytest.importorskip("openai")  # the test extra has it; the GPU machine may not
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)

from radixserve import SamplingParams
from radixserve.engine.outputs import StreamDelta
from radixserve.server.openai_api import build_sampling_params, parse_chat, parse_completion

MSGS = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.state.model_name


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


SHARED = {"temperature": 0.5, "top_p": 0.9, "n": 2, "stop": ["x", "yz"], "presence_penalty": 0.5,
          "frequency_penalty": -0.5, "seed": 11, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
          "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5], "skip_special_tokens": False,
          "include_stop_str_in_output": True, "stream": True, "stream_options": {"include_usage": True},
          "user": "u1", "logit_bias": {}}
WANT = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=("x", "yz"), presence_penalty=0.5,
                      frequency_penalty=-0.5, seed=11, top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=2,
                      ignore_eos=True, stop_token_ids=(5,), skip_special_tokens=False,
                      include_stop_str_in_output=True, logprobs=3)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_every_parameter_reaches_the_engine(route):
    """Each OpenAI parameter and extension lands in SamplingParams (or the request's flags) unchanged."""
    if route == "chat":
        body = dict(SHARED, model="m", messages=MSGS, max_completion_tokens=7, logprobs=True, top_logprobs=3,
                    tools=[], tool_choice="none", response_format={"type": "text"}, parallel_tool_calls=True,
                    store=False)
        req = parse_chat(body, "m")
    else:
        body = dict(SHARED, model="m", prompt=["a", [1, 2]], max_tokens=7, logprobs=3, echo=False, best_of=2,
                    suffix="")
        req = parse_completion(body, "m")
        assert req.prompts == ["a", [1, 2]]
    assert build_sampling_params(req, [10, 20], max_context=100, default_max_tokens=16) == WANT
    assert req.stream and req.include_usage and req.user == "u1"


def test_completions_match_the_engine(client, model, engine):
    prompt = "The capital of France is"
    want = engine.generate([prompt], greedy(6), progress=False)[0]
    got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.model == model
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == 6
    assert got.usage.total_tokens == got.usage.prompt_tokens + 6


def test_token_id_prompts_and_batches(client, model, engine):
    ids = engine.tokenizer.encode("One, two, three,")
    want = engine.generate([ids, "Blue is a"], greedy(4), progress=False)
    got = client.completions.create(model=model, prompt=[ids, "Blue is a"], max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [w.text for w in want]


def test_chat_matches_engine_chat(client, model, engine):
    want = engine.chat(MSGS, greedy(8))
    got = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(engine.apply_chat_template(MSGS))
    assert got.usage.completion_tokens == 8


def test_streaming_chat_adds_up_and_reports_usage(client, model):
    whole = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        model=model, messages=MSGS, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completions_with_n(client, model):
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, n=2,
                                            temperature=0.8, seed=7, stream=True, extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, n=2, temperature=0.8,
                                      seed=7, extra_body={"ignore_eos": True})
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]  # a seed reproduces, streamed or not
    assert sum(1 for c in chunks if c.choices[0].finish_reason == "length") == 2


def test_completion_logprobs(client, model):
    got = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy: the sampled token is the top one


def test_chat_logprobs(client, model):
    got = client.chat.completions.create(model=model, messages=MSGS, max_completion_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(c.token for c in content) == got.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert bytes(c.bytes).decode() == c.token
    plain = client.chat.completions.create(model=model, messages=MSGS, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_repeated_request_reports_cached_tokens(client, model):
    first = client.chat.completions.create(model=model, messages=MSGS, max_tokens=3, temperature=0)
    second = client.chat.completions.create(model=model, messages=MSGS, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The whole prompt but its last token comes from the radix tree (that token's logits are needed).
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_stop_seed_echo_and_extensions(client, model):
    free = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[4:7]
    assert stop.strip()
    stopped = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.index(stop)]
    echoed = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=3, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True}).choices[0]
    assert echoed.text == "Count: 1, 2, 3," + free[: len(echoed.text) - len("Count: 1, 2, 3,")]
    a, b = (client.completions.create(model=model, prompt="Tell me", max_tokens=6, temperature=1.0, seed=3,
                                      extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                                                  "repetition_penalty": 1.1}).choices[0].text for _ in range(2))
    assert a == b


def test_models_health_and_flush(client, model, server, engine):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert http(server.url + "/health")[:3:2] == (200, {"status": "ok"})
    client.completions.create(model=model, prompt="Something to cache", max_tokens=2)
    assert engine.stats()["cache_tokens"] > 0
    assert http(server.url + "/flush_cache", "POST")[0] == 200
    assert engine.stats()["cache_tokens"] == 0


def test_http_stays_responsive_during_generation(client, model, server):
    """The engine steps on its own thread: health, metrics and a refused flush answer while a stream runs."""
    stream = client.completions.create(model=model, prompt="Write a long story.", max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    try:
        for _ in range(3):
            t0 = time.monotonic()
            status, _, _ = http(server.url + "/health")
            assert status == 200 and time.monotonic() - t0 < 2.0
        status, _, body = http(server.url + "/flush_cache", "POST")
        assert status == 409 and body["error"]["code"] == "engine_busy"
        assert http(server.url + "/metrics")[0] == 200
    finally:
        stream.close()  # the client goes away: the server aborts the request (the leak check verifies)


def test_native_generate(server, engine):
    url = server.url + "/generate"
    ids = engine.tokenizer.encode("A radix tree is")
    body = {"input_ids": ids, "sampling_params": {"max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                                  "logprobs": 2}}
    s1, _, first = http(url, "POST", body)
    s2, _, again = http(url, "POST", body)
    assert s1 == s2 == 200
    want = engine.generate([ids], greedy(5), progress=False)[0]
    assert first["outputs"][0]["token_ids"] == want.token_ids and first["text"] == want.text
    assert first["prompt_tokens"] == len(ids) and first["completion_tokens"] == 5
    assert len(first["outputs"][0]["logprobs"]) == 5 and len(first["outputs"][0]["logprobs"][0]["top"]) == 2
    assert again["cached_tokens"] == len(ids) - 1
    # folded_tokens appears exactly when the engine reports it (within-batch folding); never invented.
    assert ("folded_tokens" in again) == ("folded_tokens" in StreamDelta.__dataclass_fields__)
    status, _, text = http(url, "POST", dict(body, stream=True))
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert [t for e in events[:-1] for t in e["token_ids"]] == want.token_ids
    assert events[-2]["finish_reason"] == "length"


def test_embeddings(client, model, server, engine):
    if not hasattr(engine, "embed"):
        status, _, body = http(server.url + "/v1/embeddings", "POST", {"model": model, "input": "hi"})
        assert status == 501 and body["error"]["code"] == "embeddings_unavailable"
        pytest.skip("Engine.embed does not exist yet: /v1/embeddings answers 501 (checked)")
    texts = ["The cat sat on the mat.", "A dog ran in the park."]
    got = client.embeddings.create(model=model, input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1]
    for a, b in zip(got.data, floats.data):
        assert len(a.embedding) == len(b.embedding) > 0
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
        assert math.isclose(math.fsum(x * x for x in b.embedding), 1.0, rel_tol=1e-4)  # normalized by default
    assert got.usage.prompt_tokens == sum(len(engine.tokenizer.encode(t)) for t in texts)
    assert floats.data[0].embedding != floats.data[1].embedding
    want = engine.embed(texts[:1])[0]  # the server adds nothing: same as the engine, from text or token ids
    ids = client.embeddings.create(model=model, input=[engine.tokenizer.encode(texts[0])], encoding_format="float")
    assert max(abs(x - y) for x, y in zip(ids.data[0].embedding, want)) < 1e-5
    mean = client.embeddings.create(model=model, input=texts[:1], encoding_format="float",
                                    extra_body={"pooling": "mean", "normalize": False})
    assert mean.data[0].embedding != floats.data[0].embedding
    assert not math.isclose(math.fsum(x * x for x in mean.data[0].embedding), 1.0, rel_tol=1e-3)


def test_streams_from_threads_share_the_server(client, model):
    """A few clients at once, each on its own thread: every one completes its stream."""
    results: dict[int, str] = {}

    def run(i: int) -> None:
        chunks = client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and len(set(results.values())) == 1
