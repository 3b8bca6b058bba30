"""The server under abuse: a corpus of bad requests, auth, body limit, a full queue, disconnects under load.

Each bad request must get the right 4xx with an OpenAI-style JSON error body,
and a good request must succeed right after it. Under 70+ concurrent streams
with random early disconnects the others must complete with the exact greedy
output, and afterwards no KV slot may have leaked (the leak check runs after
every test).
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest
from helpers.leaks import assert_no_leak
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve import SamplingParams
from radixserve.server import BackgroundServer, ServerConfig
from radixserve.server.metrics import parse_metrics

M = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "Hi"}]
LONG = "word " * 9000  # past the 8192-token context
CHAT_PARAM = "messages"


def comp(**kw):
    return {"model": M, "prompt": "Hello", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": M, "messages": MSGS, "max_tokens": 2, **kw}


# (id, method, path, body (bytes are sent raw; (bytes, content type) with that type), status, the error's param or None)
BAD = [
    ("malformed-json", "POST", "/v1/completions", b'{"model": "x", ', 400, None),
    ("empty-body", "POST", "/v1/chat/completions", b"", 400, None),
    ("body-not-object", "POST", "/v1/completions", [1, 2], 400, None),
    ("deeply-nested", "POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("unknown-model", "POST", "/v1/completions", comp(model="gpt-17"), 400, "model"),
    ("missing-model", "POST", "/v1/chat/completions", {"messages": MSGS}, 400, "model"),
    ("model-not-string", "POST", "/v1/completions", comp(model=5), 400, "model"),
    ("missing-prompt", "POST", "/v1/completions", {"model": M}, 400, "prompt"),
    ("prompt-wrong-type", "POST", "/v1/completions", comp(prompt=42), 400, "prompt"),
    ("prompt-empty", "POST", "/v1/completions", comp(prompt=""), 400, "prompt"),
    ("prompt-ids-mixed", "POST", "/v1/completions", comp(prompt=[1, "a"]), 400, "prompt"),
    ("prompt-ids-out-of-vocab", "POST", "/v1/completions", comp(prompt=[1, 10**9]), 400, "prompt"),
    ("prompt-too-long", "POST", "/v1/completions", comp(prompt=LONG), 400, "prompt"),
    ("chat-too-long", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": LONG}]), 400,
     CHAT_PARAM),
    ("max-tokens-past-context", "POST", "/v1/completions", comp(max_tokens=100000), 400, "max_tokens"),
    ("max-tokens-negative", "POST", "/v1/completions", comp(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-string", "POST", "/v1/completions", comp(max_tokens="5"), 400, "max_tokens"),
    ("max-tokens-float", "POST", "/v1/chat/completions", chat(max_completion_tokens=2.5), 400,
     "max_completion_tokens"),
    ("max-tokens-conflict", "POST", "/v1/chat/completions", chat(max_tokens=3, max_completion_tokens=4), 400,
     "max_tokens"),
    ("temperature-negative", "POST", "/v1/completions", comp(temperature=-1), 400, "temperature"),
    ("temperature-above-2", "POST", "/v1/chat/completions", chat(temperature=2.5), 400, "temperature"),
    ("temperature-string", "POST", "/v1/completions", comp(temperature="hot"), 400, "temperature"),
    ("top-p-zero", "POST", "/v1/completions", comp(top_p=0), 400, "top_p"),
    ("top-p-above-1", "POST", "/v1/completions", comp(top_p=1.5), 400, "top_p"),
    ("top-k-negative", "POST", "/v1/completions", comp(top_k=-5), 400, "top_k"),
    ("min-p-above-1", "POST", "/v1/completions", comp(min_p=2), 400, "min_p"),
    ("repetition-penalty-zero", "POST", "/v1/completions", comp(repetition_penalty=0), 400, "repetition_penalty"),
    ("presence-penalty-range", "POST", "/v1/chat/completions", chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-range", "POST", "/v1/completions", comp(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("n-zero", "POST", "/v1/completions", comp(n=0), 400, "n"),
    ("n-too-large", "POST", "/v1/completions", comp(n=1000), 400, "n"),
    ("n-bool", "POST", "/v1/chat/completions", chat(n=True), 400, "n"),
    ("seed-string", "POST", "/v1/completions", comp(seed="42"), 400, "seed"),
    ("stop-ints", "POST", "/v1/completions", comp(stop=[1, 2]), 400, "stop"),
    ("stop-too-many", "POST", "/v1/chat/completions", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("min-tokens-above-max", "POST", "/v1/completions", comp(min_tokens=5), 400, "min_tokens"),
    ("ignore-eos-not-bool", "POST", "/v1/completions", comp(ignore_eos="yes"), 400, "ignore_eos"),
    ("logprobs-too-many", "POST", "/v1/completions", comp(logprobs=50), 400, "logprobs"),
    ("chat-logprobs-not-bool", "POST", "/v1/chat/completions", chat(logprobs=3), 400, "logprobs"),
    ("top-logprobs-without-logprobs", "POST", "/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
    ("top-logprobs-too-many", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("prompt-logprobs-streamed", "POST", "/v1/completions", comp(prompt_logprobs=1, stream=True), 400,
     "prompt_logprobs"),
    ("prompt-logprobs-bool", "POST", "/v1/chat/completions", chat(prompt_logprobs=True), 400, "prompt_logprobs"),
    ("prompt-logprobs-too-many", "POST", "/v1/completions", comp(prompt_logprobs=21), 400, "prompt_logprobs"),
    ("prompt-logprobs-vocabulary", "POST", "/v1/chat/completions", chat(prompt_logprobs=-1), 400,
     "prompt_logprobs"),
    ("logprobs-below-minus-one", "POST", "/v1/completions", comp(logprobs=-2), 400, "logprobs"),
    ("stream-not-bool", "POST", "/v1/completions", comp(stream="true"), 400, "stream"),
    ("stream-options-without-stream", "POST", "/v1/chat/completions", chat(stream_options={"include_usage": True}),
     400, "stream_options"),
    ("stream-options-unknown-key", "POST", "/v1/chat/completions", chat(stream=True, stream_options={"x": 1}), 400,
     "stream_options.x"),
    ("unknown-parameter", "POST", "/v1/completions", comp(foo=1), 400, "foo"),
    ("logit-bias-past-vocabulary", "POST", "/v1/completions", comp(logit_bias={"50256": -100}), 400, "logit_bias"),
    ("suffix-unsupported", "POST", "/v1/completions", comp(suffix="end"), 400, "suffix"),
    ("best-of-unsupported", "POST", "/v1/completions", comp(best_of=3), 400, "best_of"),
    ("tools-unsupported", "POST", "/v1/chat/completions",
     chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response-format-unknown-type", "POST", "/v1/chat/completions", chat(response_format={"type": "xml"}), 400,
     "response_format.type"),
    ("messages-missing", "POST", "/v1/chat/completions", {"model": M}, 400, "messages"),
    ("messages-empty", "POST", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("message-bad-role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role"),
    ("message-content-type", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content"),
    ("message-image-part", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0]"),
    ("message-unknown-key", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x", "tool_call_id": "1"}]), 400, "messages[0].tool_call_id"),
    ("generate-both-inputs", "POST", "/generate", {"text": "a", "input_ids": [1]}, 400, "text"),
    ("generate-unknown-sampling-key", "POST", "/generate", {"text": "a", "sampling_params": {"temp": 1}}, 400,
     "sampling_params.temp"),
    ("generate-bad-sampling-value", "POST", "/generate", {"text": "a", "sampling_params": {"top_p": 7}}, 400,
     "sampling_params.top_p"),
    ("embeddings-bad-input", "POST", "/v1/embeddings", {"model": M, "input": 7}, 400, "input"),
    # Text no tokenizer can encode: a lone UTF-16 surrogate (JSON spells it "\ud800") in any text field, named.
    ("surrogate-prompt", "POST", "/v1/completions", comp(prompt="a\ud800b"), 400, "prompt"),
    ("surrogate-prompt-list", "POST", "/v1/completions", comp(prompt=["ok", "\udc00"]), 400, "prompt[1]"),
    ("surrogate-chat-content", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "\ud83d"}]),
     400, "messages[0].content"),
    ("surrogate-chat-part", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]}]), 400, "messages[0].content[1].text"),
    ("surrogate-stop", "POST", "/v1/completions", comp(stop="\ud800"), 400, "stop"),
    ("surrogate-stop-list", "POST", "/v1/chat/completions", chat(stop=["x", "\ud800"]), 400, "stop[1]"),
    ("surrogate-generate-text", "POST", "/generate", {"text": "\ud800"}, 400, "text"),
    ("surrogate-generate-stop", "POST", "/generate", {"text": "a", "sampling_params": {"stop": ["\ud800"]}}, 400,
     "sampling_params.stop[0]"),
    ("surrogate-embeddings-input", "POST", "/v1/embeddings", {"model": M, "input": ["ok", "\ud800"]}, 400,
     "input[1]"),
    ("surrogate-model", "POST", "/v1/completions", comp(model="\ud800"), 400, "model"),
    ("surrogate-user", "POST", "/v1/chat/completions", chat(user="\ud800"), 400, "user"),
    ("surrogate-parameter-name", "POST", "/v1/completions", {**comp(), "\ud800": 1}, 400, None),
    ("invalid-utf8-body", "POST", "/v1/completions", b'{"model": "m", "prompt": "\xff\xfe"}', 400, None),
    ("utf8-encoded-surrogate-body", "POST", "/generate", b'{"text": "\xed\xa0\x80"}', 400, None),
    ("text-plain-body", "POST", "/v1/completions", (json.dumps(comp()).encode(), "text/plain"), 415, None),
    ("form-body", "POST", "/v1/chat/completions", (json.dumps(chat()).encode(), "application/x-www-form-urlencoded"),
     415, None),
    ("unknown-route", "GET", "/v1/nothing-here", None, 404, None),
    ("wrong-method", "GET", "/v1/completions", None, 405, None),
    ("flush-wrong-method", "GET", "/flush_cache", None, 405, None),
]


def _good_request_succeeds(url: str) -> None:
    status, _, body = http(url + "/v1/completions", "POST", comp(max_tokens=1))
    assert status == 200 and body["usage"]["completion_tokens"] == 1, body


@pytest.mark.parametrize("name, method, path, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_4xx_json_error(server, engine, name, method, path, body, status, param):
    content_type = {}
    if isinstance(body, tuple):
        body, content_type = body[0], {"Content-Type": body[1]}
    raw = body if isinstance(body, bytes) else None
    got, headers, err = http(server.url + path, method, None if raw is not None else body, raw=raw,
                             headers=content_type)
    assert got == status, err
    assert headers["Content-Type"].startswith("application/json")
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]
    assert err["error"]["param"] == param, err
    if got < 500:
        assert err["error"]["type"] == "invalid_request_error"
    _good_request_succeeds(server.url)


def test_corpus_is_big_enough():
    assert len({b[0] for b in BAD}) == len(BAD) >= 25


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**70, 1e308, -0.5, 2.5, float("nan")]),
    st.text(max_size=3), st.lists(st.integers(0, 60000), max_size=3), st.lists(st.text(max_size=2), max_size=3),
    st.text(st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=3),  # lone surrogates among letters
    st.just({}), st.just({"type": "text"}), st.just({"include_usage": True}), st.just([{"role": "user"}]),
    st.just([{"type": "text", "text": "a"}]), st.just([{"role": "user", "content": "hi"}]),
)
PARAMS = sorted({"prompt", "messages", "temperature", "top_p", "n", "stream", "stream_options", "logprobs",
                 "top_logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
                 "user", "seed", "suffix", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "response_format", "tools", "tool_choice", "store", "prompt_logprobs", "bogus"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    changes=st.dictionaries(st.sampled_from(PARAMS), JUNK, max_size=3),
    max_tokens=st.sampled_from([1, 1, 0, -1, "1", 1.5, True]),
)
def test_no_body_makes_a_5xx(server, path, changes, max_tokens):
    """Whatever a client sends, a mistake is a 4xx with an error body, never a 500 (at most 1 token is generated)."""
    body = dict(comp() if "chat" not in path else chat(), **changes, max_tokens=max_tokens)
    if isinstance(body.get("n"), int) and body["n"] > 3:
        body["n"] = 3  # keep CPU time bounded
    status, _, answer = http(server.url + path, "POST", body)
    assert status == 200 or (400 <= status < 500 and set(answer["error"]) == {"message", "type", "param", "code"}), (
        status, answer)


def test_body_size_limit(engine):
    with BackgroundServer(engine, ServerConfig(port=0, max_body_bytes=4096)) as srv:
        status, _, err = http(srv.url + "/v1/completions", "POST", comp(prompt="x" * 5000))
        assert status == 413 and err["error"]["code"] == "request_too_large"
        _good_request_succeeds(srv.url)


def test_api_key(engine):
    with BackgroundServer(engine, ServerConfig(port=0, api_key="s3cret")) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, hdrs, err = http(srv.url + "/v1/completions", "POST", comp(), headers=headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert hdrs.get("WWW-Authenticate") == "Bearer"
        assert http(srv.url + "/metrics")[0] == 401
        assert http(srv.url + "/health")[0] == 200  # probes need no key
        ok = {"Authorization": "Bearer s3cret"}
        status, _, body = http(srv.url + "/v1/completions", "POST", comp(max_tokens=1), headers=ok)
        assert status == 200 and body["usage"]["completion_tokens"] == 1


async def _first_chunk(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    resp = await session.post(url + "/v1/completions", json=comp(max_tokens=300, stream=True, ignore_eos=True))
    assert resp.status == 200
    await resp.content.readline()
    return resp


def test_full_queue_answers_503_with_retry_after(engine):
    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            busy = [await _first_chunk(session, url) for _ in range(2)]
            async with session.post(url + "/v1/completions", json=comp()) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                err = await resp.json()
                assert err["error"]["code"] == "server_overloaded" and err["error"]["type"] == "server_error"
            async with session.post(url + "/v1/completions", json=comp(n=3)) as resp:  # can never fit
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "n"
            for resp in busy:
                resp.close()  # disconnect: the server aborts them and admits again

    with BackgroundServer(engine, ServerConfig(port=0, max_pending_requests=2)) as srv:
        asyncio.run(scenario(srv.url))
        deadline = time.monotonic() + 30
        while srv.state.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.state.pending == 0
        _good_request_succeeds(srv.url)
        assert parse_metrics(http(srv.url + "/metrics")[2]).get("radixserve_rejected_requests_total") == 1


def test_disconnect_aborts_a_non_streaming_request(server, engine):
    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(session.post(server.url + "/v1/completions",
                                                    json=comp(max_tokens=2000, ignore_eos=True)))
            deadline = time.monotonic() + 30
            while engine.stats()["running"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            task.cancel()  # closes the connection

    before = engine.stats()["generated_tokens"]
    asyncio.run(scenario())
    assert engine.wait_idle(30)
    assert engine.stats()["generated_tokens"] - before < 2000


PROMPTS = [f"Story {i}: once upon a time, a {w}" for i, w in enumerate(
    ["cat", "dog", "robot", "river", "king", "tree", "star", "ship"])]


async def _stream_one(session: aiohttp.ClientSession, url: str, prompt: str, leave_after: int | None) -> str | None:
    """Stream a completion; with `leave_after`, disconnect after that many chunks (0: before any)."""
    body = {"model": M, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        text, chunks = "", 0
        async for line in resp.content:
            if leave_after is not None and chunks >= leave_after:
                resp.close()
                return None
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return text
            text += json.loads(payload)["choices"][0]["text"]
            chunks += 1
    raise AssertionError("stream ended without [DONE]")


def test_concurrent_streams_with_random_disconnects(server, engine):
    want = {p: o.text for p, o in zip(PROMPTS, engine.generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), progress=False))}
    assert_no_leak(engine)
    rng = random.Random(1234)
    plan = [(PROMPTS[i % len(PROMPTS)], rng.choice([None, None, 0, 1, 3])) for i in range(72)]

    async def cancel_later(session: aiohttp.ClientSession, prompt: str) -> None:
        task = asyncio.create_task(_stream_one(session, server.url, prompt, None))
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # maybe while queued, maybe during prefill or decode
        task.cancel()

    async def scenario() -> list:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            jobs = [_stream_one(session, server.url, p, leave) for p, leave in plan]
            jobs += [cancel_later(session, PROMPTS[i]) for i in range(6)]
            return await asyncio.gather(*jobs, return_exceptions=True)

    generated = engine.stats()["generated_tokens"]
    aborted = parse_metrics(http(server.url + "/metrics")[2]).get("radixserve_aborted_requests_total")
    results = asyncio.run(scenario())
    assert engine.wait_idle(60)
    generated = engine.stats()["generated_tokens"] - generated
    # Disconnected requests stop early: fewer tokens than every request running to the end.
    assert generated < (len(plan) + 6) * 8 - 20
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    finished = [(p, r) for (p, leave), r in zip(plan, results) if leave is None]
    assert len(finished) >= 30
    for prompt, text in finished:
        assert text == want[prompt]  # greedy output is the same whatever shares the batch

    deadline = time.monotonic() + 60
    while (server.state.pending or server.state.inflight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.pending == 0 and server.state.inflight == 0
    aborted = parse_metrics(http(server.url + "/metrics")[2]).get("radixserve_aborted_requests_total") - aborted
    left = sum(1 for _, leave in plan if leave is not None)
    assert left // 2 <= aborted <= left + 6
    assert_no_leak(engine)  # every KV slot is back on the free list after a flush
    _good_request_succeeds(server.url)
