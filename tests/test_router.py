"""The router in front of two real CPU replica servers (SmolLM2, one engine each), over HTTP.

What goes through the router comes back as the replica gave it (JSON and streams, through the
official openai client too); the same long prefix keeps landing on the replica that caches it;
the API key is checked at the router and passed on; replicas join and leave at run time; a
replica that stops answering leaves the rotation and its requests go to another.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai")
from helpers.leaks import assert_no_leak  # noqa: E402
from helpers.server import http, sse_events  # noqa: E402

from radixserve.router import BackgroundRouter, RouterConfig  # noqa: E402
from radixserve.router.metrics import metric  # noqa: E402
from radixserve.router.proxy import REPLICA_HEADER  # noqa: E402
from radixserve.server import BackgroundServer, ServerConfig  # noqa: E402

KEY = "router-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, name the port "
          "of departure and the port of arrival, and never invent a tracking number. ") * 6


@pytest.fixture(scope="module")
def engines(smollm_path) -> Iterator[list]:
    from radixserve import Engine

    made = [Engine(str(smollm_path), device="cpu", check_invariants=True, max_running_requests=8)
            for _ in range(2)]
    yield made
    for e in made:
        assert_no_leak(e)
        e.shutdown()


@pytest.fixture(autouse=True)
def leak_check(engines) -> Iterator[None]:
    yield
    for e in engines:
        assert_no_leak(e)


@pytest.fixture(scope="module")
def replicas(engines) -> Iterator[list[BackgroundServer]]:
    servers = [BackgroundServer(e, ServerConfig(port=0, api_key=KEY)).start() for e in engines]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def router(replicas) -> Iterator[BackgroundRouter]:
    config = RouterConfig(replicas=tuple(s.url for s in replicas), policy="cache_aware", health_interval=0.5,
                          server=ServerConfig(port=0, api_key=KEY))
    with BackgroundRouter(config) as r:
        yield r


@pytest.fixture(scope="module")
def model(replicas) -> str:
    return replicas[0].state.model_name


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, object]:
    return http(url + path, "POST", body, headers=AUTH if headers is None else headers)


def replicas_of(router: BackgroundRouter) -> dict[str, dict]:
    status, _, body = http(router.url + "/router/replicas", headers=AUTH)
    assert status == 200
    return {r["url"]: r for r in body["replicas"]}


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_answers_pass_through_unchanged(router, replicas, model):
    msgs = [{"role": "user", "content": "Name a color."}]
    via, direct = client(router.url), client(replicas[0].url)
    for c in (via, direct):  # both replicas run the same model: the same greedy answer whichever serves it
        got = c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.usage.completion_tokens == 8
        if c is via:
            routed = got
    assert routed.choices[0].message.content == got.choices[0].message.content
    assert routed.usage.prompt_tokens == got.usage.prompt_tokens
    chunks = list(via.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == got.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    comp = via.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert comp.choices[0].text == direct.completions.create(model=model, prompt="The capital of France is",
                                                             max_tokens=6, temperature=0).choices[0].text

    # The raw streams: the same events, one by one, ending with [DONE] (ids and times aside).
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    streams = [sse_events(post(url, "/v1/completions", body)[2]) for url in (router.url, replicas[1].url)]
    assert streams[0][-1] == streams[1][-1] == "[DONE]"
    assert [e["choices"] for e in streams[0][:-1]] == [e["choices"] for e in streams[1][:-1]]
    native = {"text": "Hello", "sampling_params": {"max_tokens": 3, "temperature": 0}}
    status, headers, answer = post(router.url, "/generate", native)
    assert status == 200 and len(answer["outputs"][0]["token_ids"]) == 3 and headers[REPLICA_HEADER]


def test_the_same_prefix_lands_on_the_same_replica(router, model):
    def ask(system: str, question: str) -> tuple[str, int]:
        body = {"model": model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        status, headers, answer = post(router.url, "/v1/chat/completions", body)
        assert status == 200, answer
        return headers[REPLICA_HEADER], answer["usage"]["prompt_tokens_details"]["cached_tokens"]

    first, _ = ask(SYSTEM, "Where does parcel 1 go?")
    other, _ = ask("A different, equally long instruction about gardening and soil. " * 8, "Which plant?")
    assert other != first  # a new prefix goes to the least cached replica
    for i in range(2, 6):
        replica, cached = ask(SYSTEM, f"Where does parcel {i} go?")
        assert replica == first
        assert cached > 200  # the replica's own cache served the shared system prompt
    tree = replicas_of(router)[first]["approx_cached_tokens"]
    assert tree > len(SYSTEM) // 3  # three characters a key element


@pytest.mark.parametrize("stream", [False, True])
def test_the_router_records_answers_for_the_next_turn(router, model, stream):
    """After a chat answer, the replica's tree holds prompt + answer: the next turn, which quotes the
    answer, matches all of it there."""
    from radixserve.router.keys import answered_key, request_key

    turn1 = [{"role": "system", "content": f"Conversation {stream}: a long story about ships. " * 4},
             {"role": "user", "content": "Tell me a story."}]
    body = {"model": model, "messages": turn1, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    status, headers, answer = post(router.url, "/v1/chat/completions", body)
    assert status == 200
    if stream:
        reply = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(answer)[:-1])
    else:
        reply = answer["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    expect = answered_key("chat", {"messages": turn1}, reply)
    assert len(expect.ids) > len(request_key("chat", {"messages": turn1}).ids) + 10
    tree = router.state.policy.trees[headers[REPLICA_HEADER]]
    matched = router.call(lambda: tree.match(request_key("chat", {"messages": turn2})).length).result(10)
    assert matched == len(expect.ids)


def test_api_key_is_enforced_and_passed_on(router, replicas, model):
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    before = replicas_of(router)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, hdrs, answer = post(router.url, "/v1/completions", body, headers=headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and hdrs["WWW-Authenticate"]
    for path in ("/router/replicas", "/metrics", "/v1/models"):
        assert http(router.url + path)[0] == 401
    assert {u: r["requests"] for u, r in replicas_of(router).items()} == {u: r["requests"] for u, r in before.items()}
    # The replicas want the key too: the router's 200 means it passed the client's key on.
    assert post(replicas[0].url, "/v1/completions", body, headers={})[0] == 401
    assert post(router.url, "/v1/completions", body)[0] == 200
    assert http(router.url + "/health")[0] == 200  # open, as on a server


def test_other_routes(router, replicas, model):
    status, _, health = http(router.url + "/health")
    assert status == 200 and health == {"status": "ok", "healthy_replicas": 2, "replicas": 2}
    status, _, models = http(router.url + "/v1/models", headers=AUTH)
    assert status == 200 and models["data"][0]["id"] == model
    assert http(router.url + f"/v1/models/{model}", headers=AUTH)[0] == 200
    status, _, tokens = post(router.url, "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 0
    assert post(router.url, "/detokenize", {"tokens": tokens["tokens"]})[2]["prompt"].endswith("Hello world")
    # The replica's own 400s come back as they are.
    status, _, err = post(router.url, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 400 and err["error"]["param"] == "model"
    status, _, err = http(router.url + "/v1/completions", "POST", raw=b"{not json", headers=AUTH)
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, _, err = http(router.url + "/nowhere", headers=AUTH)
    assert status == 404 and err["error"]["code"] == "not_found"
    status, _, flushed = post(router.url, "/flush_cache", {})
    assert status == 200 and flushed["flushed"] and len(flushed["replicas"]) == 2
    status, _, text = http(router.url + "/metrics", headers=AUTH)
    assert all(metric(text, "radixserve_router_replica_healthy", replica=s.url) == 1.0 for s in replicas)
    assert metric(text, "radixserve_router_requests_total") >= 3
    assert metric(text, "radixserve_router_responses_total", route="/v1/completions", status="400") >= 2
    assert metric(text, "radixserve_router_decisions_total", policy="cache_aware") >= 3


def test_replicas_join_and_leave_at_run_time(router, replicas, model):
    gone = replicas[1].url
    status, _, removed = http(router.url + "/router/replicas?url=" + gone, "DELETE", headers=AUTH)
    assert status == 200 and removed["url"] == gone
    body = {"model": model, "prompt": "Count: one, two,", "max_tokens": 1}
    for i in range(4):
        status, headers, _ = post(router.url, "/v1/completions", dict(body, prompt=f"Topic {i} " * 20))
        assert status == 200 and headers[REPLICA_HEADER] == replicas[0].url
    assert http(router.url + "/router/replicas?url=" + gone, "DELETE", headers=AUTH)[0] == 404
    status, _, added = post(router.url, "/router/replicas", {"url": gone + "/"})
    assert status == 201 and added["url"] == gone and added["healthy"]
    assert post(router.url, "/router/replicas", {"url": gone})[0] == 409
    for bad in ({"url": "ftp://x"}, {"url": 5}, {}):
        status, _, err = post(router.url, "/router/replicas", bad)
        assert status == 400 and err["error"]["param"] == "url"
    assert post(router.url, "/router/replicas", {"url": gone}, headers={})[0] == 401
    assert set(replicas_of(router)) == {s.url for s in replicas}


def test_a_late_body_gets_the_routers_own_408(replicas):
    config = RouterConfig(replicas=(replicas[0].url,), health_interval=60.0,
                          server=ServerConfig(port=0, body_timeout=1.0))
    with BackgroundRouter(config) as router:
        host, port = router.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # 99 bytes of the body never come
            got = b""
            while chunk := sock.recv(65536):  # until the router closes the connection
                got += chunk
        head, _, payload = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head, got
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 9
        assert metric(http(router.url + "/metrics")[2], "radixserve_router_responses_total", status="408") == 1


def test_replicas_are_checked_once_at_start(engines):
    """The startup check is the health checker's first round: the next waits for `health_interval` (or a
    failed request), so that no check races the first requests."""
    server = BackgroundServer(engines[0], ServerConfig(port=0)).start()

    def checks() -> float:
        return metric(http(server.url + "/metrics")[2], "radixserve_http_requests_total", route="/health")

    try:
        with BackgroundRouter(RouterConfig(replicas=(server.url,), health_interval=60.0)):
            time.sleep(0.5)
            assert checks() == 1
    finally:
        server.stop()


def test_a_failed_replica_leaves_and_its_requests_are_retried(engines, replicas, model):
    """A replica that stops answering (its server closed) or answers 503 (draining): the request goes to
    another replica before anything reached the client, and the replica leaves the rotation."""
    doomed = BackgroundServer(engines[1], ServerConfig(port=0, api_key=KEY)).start()
    draining = BackgroundServer(engines[1], ServerConfig(port=0, api_key=KEY)).start()
    config = RouterConfig(replicas=(doomed.url, draining.url, replicas[0].url), policy="round_robin",
                          health_interval=60.0, server=ServerConfig(port=0, api_key=KEY))
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
    try:
        with BackgroundRouter(config) as router:
            assert all(r["healthy"] for r in replicas_of(router).values())
            doomed.stop()  # nothing listens there any more; no health check runs before the next request
            # Round robin: doomed's turn; its connection is refused, so the next replica answers.
            status, headers, answer = post(router.url, "/v1/completions", body)
            assert status == 200 and headers[REPLICA_HEADER] == draining.url, answer
            state = replicas_of(router)
            assert not state[doomed.url]["healthy"] and "request failed" in state[doomed.url]["last_error"]
            draining.state.draining = True  # from now on it answers 503, its /health included
            status, headers, _ = post(router.url, "/v1/completions", body)  # replicas[0]'s turn
            assert status == 200 and headers[REPLICA_HEADER] == replicas[0].url
            # draining's turn: 503 before anything was sent, so the stream goes to replicas[0].
            status, headers, text = post(router.url, "/v1/completions", dict(body, stream=True))
            assert status == 200 and headers[REPLICA_HEADER] == replicas[0].url
            assert sse_events(text)[-1] == "[DONE]"
            # The 503 had the health checks run at once: the draining replica is out too.
            wait_for(lambda: not replicas_of(router)[draining.url]["healthy"])
            text = http(router.url + "/metrics", headers=AUTH)[2]
            assert metric(text, "radixserve_router_retries_total", reason="connection") == 1
            assert metric(text, "radixserve_router_retries_total", reason="status") == 1
            # No healthy replica left: a 503 of the router's own, and its /health says so.
            http(router.url + "/router/replicas?url=" + replicas[0].url, "DELETE", headers=AUTH)
            status, _, err = post(router.url, "/v1/completions", body)
            assert status == 503 and err["error"]["code"] == "no_healthy_replica"
            assert http(router.url + "/health")[0] == 503
    finally:
        draining.state.draining = False
        draining.stop()


def test_streams_from_threads_share_the_router(router, model):
    results: list[int] = []

    def one(i: int) -> None:
        body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 4, "temperature": 0, "stream": True,
                "ignore_eos": True}
        status, _, text = post(router.url, "/v1/completions", body)
        events = sse_events(text)
        results.append(status if events[-1] == "[DONE]" and len(events) == 5 else -1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 6
    wait_for(lambda: all(r["inflight"] == 0 for r in replicas_of(router).values()))


def test_the_router_command(replicas, model):
    cmd = [sys.executable, "-m", "radixserve", "router", "--port", "0", "--policy", "least_load",
           *[a for s in replicas for a in ("--replica", s.url)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, RADIXSERVE_API_KEY=KEY))
    try:
        line = proc.stdout.readline()
        match = re.search(r"routing at (http://127\.0\.0\.1:\d+) over 2 replicas \(least_load\)", line)
        assert match, line
        url = match.group(1)
        status, headers, answer = post(url, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 1})
        assert status == 200 and headers[REPLICA_HEADER] in {s.url for s in replicas}, answer
        assert post(url, "/v1/completions", {"model": model, "prompt": "Hi"}, headers={})[0] == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
