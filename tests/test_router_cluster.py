"""The router over THREE CPU replica processes of the built-in model (`radixserve serve`, small
KV caches), on loopback: the cluster's prefix-cache hit rate by policy, read from each replica's
/metrics; the router's answers to bad input beside a replica's own; and a replica killed while
requests are in flight there, none of them lost.

One fleet for the module; the test that kills a replica runs last.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.server import http

from radixserve.router import BackgroundRouter, RouterConfig
from radixserve.router.metrics import metric
from radixserve.router.proxy import REPLICA_HEADER
from radixserve.server import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "demo"
MAX_BODY_MB = 1


class Replica:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url


def _start(smollm_path: Path) -> subprocess.Popen:
    env = dict(os.environ, RADIXSERVE_API_KEY=KEY, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "radixserve", "serve", "--model", str(smollm_path), "--device", "cpu",
           "--port", "0", "--served-model-name", MODEL, "--kv-cache-tokens", "4096",
           "--max-running-requests", "8", "--max-body-mb", str(MAX_BODY_MB), "--no-show-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _url_of(proc: subprocess.Popen, timeout: float = 300.0) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"^radixserve: serving \S+ at (http://127\.0\.0\.1:\d+)", line)
        if match:
            # Keep draining its output so that the replica never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return match.group(1)
    raise AssertionError("a replica did not start:\n" + "".join(seen[-40:]))


@pytest.fixture(scope="module")
def fleet(smollm_path) -> Iterator[list[Replica]]:
    procs = [_start(smollm_path) for _ in range(3)]
    try:
        replicas = [Replica(p, _url_of(p)) for p in procs]
        yield replicas
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _router(replicas: list[Replica], policy: str) -> BackgroundRouter:
    config = RouterConfig(replicas=tuple(r.url for r in replicas), policy=policy, health_interval=0.5,
                          server=ServerConfig(port=0, api_key=KEY, max_body_bytes=MAX_BODY_MB * 2**20))
    return BackgroundRouter(config)


# -- hit rate -------------------------------------------------------------------------------

GROUPS = 4
PER_GROUP = 6
TOPICS = ("shipping containers between Rotterdam and Singapore", "orchard soil, pruning and frost",
          "a small bakery's morning schedule", "maintenance of regional railway signals")


def _workload() -> list[str]:
    """GROUPS long shared prefixes (over 100 tokens each), PER_GROUP short questions on each, shuffled."""
    prompts = []
    for g, topic in enumerate(TOPICS[:GROUPS]):
        head = (f"Manual {g}. You are an assistant who answers questions about {topic}. Keep every answer "
                "short, accurate and polite, cite the section you rely on, and say so when unsure. ") * 3
        prompts += [f"{head}\nQuestion {q}: what does step {q + 2} of the {topic} procedure say?\nAnswer:"
                    for q in range(PER_GROUP)]
    random.Random(4).shuffle(prompts)
    return prompts


def _counters(replicas: list[Replica]) -> tuple[float, float]:
    hit = queried = 0.0
    for r in replicas:
        status, _, text = http(r.url + "/metrics", headers=AUTH)
        assert status == 200
        hit += metric(text, "radixserve_prefix_cache_hit_tokens_total")
        queried += metric(text, "radixserve_prefix_cache_queried_tokens_total")
    return hit, queried


def _hit_rate(replicas: list[Replica], send_to: str) -> float:
    """Every replica's cache flushed, the workload sent one request at a time to `send_to` (a router or
    a replica), and the hit tokens over the queried tokens that the replicas' /metrics counted."""
    for r in replicas:
        assert http(r.url + "/flush_cache", "POST", {}, headers=AUTH)[0] == 200
    hit0, queried0 = _counters(replicas)
    for prompt in _workload():
        status, _, answer = http(send_to + "/v1/completions", "POST",
                                 {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0},
                                 headers=AUTH)
        assert status == 200, answer
    hit1, queried1 = _counters(replicas)
    assert queried1 - queried0 > GROUPS * PER_GROUP * 100
    return (hit1 - hit0) / (queried1 - queried0)


def test_cache_aware_routing_keeps_the_hit_rate_of_one_replica(fleet):
    rates = {}
    for policy in ("cache_aware", "round_robin"):
        with _router(fleet, policy) as router:
            rates[policy] = _hit_rate(fleet, router.url)
            listed = http(router.url + "/router/replicas", headers=AUTH)[2]["replicas"]
            served = [r["requests"] for r in listed]
            assert sum(served) == GROUPS * PER_GROUP
            if policy == "cache_aware":  # the groups spread: no replica took them all
                assert max(served) < GROUPS * PER_GROUP
    rates["one_replica"] = _hit_rate(fleet[:1], fleet[0].url)
    print("cluster token hit rates:", {k: round(v, 3) for k, v in rates.items()})
    # Each group misses its head once under cache_aware (as on one replica), about once per replica
    # under round robin.
    assert rates["cache_aware"] > rates["round_robin"] + 0.2
    assert rates["cache_aware"] >= rates["one_replica"] - 0.05


# -- bad input: the router's answers are the replica's ----------------------------------------

BAD = {
    "bad JSON": dict(path="/v1/completions", raw=b'{"model": "demo", "prompt": '),
    "JSON not an object": dict(path="/v1/chat/completions", raw=b"[1, 2]"),
    "wrong content type": dict(path="/v1/completions", raw=b'{"model": "demo", "prompt": "hi"}',
                               headers={"Content-Type": "text/plain"}),
    "no content type": dict(path="/v1/chat/completions", raw=b'{"model": "demo"}', headers={"Content-Type": ""}),
    "unknown field": dict(path="/v1/completions", body={"model": MODEL, "prompt": "hi", "max_tokns": 3}),
    "unknown chat field": dict(path="/v1/chat/completions",
                               body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tmperature": 1}),
    "bad value": dict(path="/v1/completions", body={"model": MODEL, "prompt": "hi", "max_tokens": -1}),
    "missing field": dict(path="/v1/chat/completions", body={"model": MODEL}),
    "unknown model": dict(path="/v1/completions", body={"model": "nope", "prompt": "hi"}),
    "bad message": dict(path="/v1/chat/completions", body={"model": MODEL, "messages": [{"role": "robot"}]}),
    "oversize body": dict(path="/v1/completions",
                          body={"model": MODEL, "prompt": "x" * (MAX_BODY_MB * 2**20 + 10)}),
    "missing API key": dict(path="/v1/completions", body={"model": MODEL, "prompt": "hi"}, auth={}),
    "wrong API key": dict(path="/v1/chat/completions", body={"model": MODEL, "messages": []},
                          auth={"Authorization": "Bearer nope"}),
    "unknown route": dict(path="/v1/nowhere", body={}),
    "wrong method": dict(path="/v1/completions", method="GET"),
}


def _ask(url: str, case: dict) -> tuple[int, dict, object]:
    headers = {**case.get("auth", AUTH), **case.get("headers", {})}
    method = case.get("method", "POST")
    if method == "GET":
        return http(url + case["path"], "GET", headers=headers)
    return http(url + case["path"], method, case.get("body"), raw=case.get("raw"), headers=headers)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_the_same_answer_from_the_router_as_from_a_replica(fleet, name):
    case = BAD[name]
    with _router(fleet, "cache_aware") as router:
        got = _ask(router.url, case)
        listed = http(router.url + "/router/replicas", headers=AUTH)[2]["replicas"]
    want = _ask(fleet[0].url, case)
    status, headers, body = got
    assert 400 <= status < 500 and status == want[0], (got, want)
    assert isinstance(body, dict) and isinstance(want[2], dict), (body, want[2])
    err, want_err = body["error"], want[2]["error"]
    assert set(err) == set(want_err) and isinstance(err["message"], str) and err["message"]
    assert (err["type"], err["code"], err["param"]) == (want_err["type"], want_err["code"], want_err["param"])
    assert headers["Content-Type"].startswith("application/json")
    for name_ in ("WWW-Authenticate", "Allow"):
        assert (name_ in headers) == (name_ in want[1])
    if status in (401, 404, 405, 413):  # answered by the router itself: no replica saw it
        assert sum(r["requests"] for r in listed) == 0


# -- a replica killed mid-run (last: the fleet loses one) -----------------------------------


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(fleet):
    """Requests in flight at a replica when it is killed (SIGKILL) had sent nothing to their
    clients yet: the router sends each again to another replica, and every one is answered whole."""
    n = 9
    results: dict[int, tuple[int, dict, object]] = {}

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Request {i}: tell me about the sea.", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True}
        results[i] = http(router.url + "/v1/completions", "POST", body, headers=AUTH, timeout=300)

    victim = fleet[1]
    with _router(fleet, "round_robin") as router:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while True:  # kill once the victim has requests in flight
            listed = {r["url"]: r for r in http(router.url + "/router/replicas", headers=AUTH)[2]["replicas"]}
            if listed[victim.url]["inflight"] >= 2:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.02)
        victim.proc.kill()
        victim.proc.wait()
        for t in threads:
            t.join(timeout=300)
        text = http(router.url + "/metrics", headers=AUTH)[2]
        listed = {r["url"]: r for r in http(router.url + "/router/replicas", headers=AUTH)[2]["replicas"]}
    assert sorted(results) == list(range(n))
    for i, (status, headers, answer) in results.items():
        assert status == 200, (i, answer)
        assert answer["usage"]["completion_tokens"] == 24
        assert headers[REPLICA_HEADER] != victim.url
    assert metric(text, "radixserve_router_retries_total", reason="connection") >= 2
    assert not listed[victim.url]["healthy"]
