"""Fixtures and helpers shared by the HTTP server tests (no tests here).

A test module imports `engine`, `server` and `leak_check` from here: one
SmolLM2 engine on CPU per module, a real server on a free loopback port in a
background thread, and a leak check (every KV slot back after a flush) after
every test.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.leaks import assert_no_leak
from radixserve.server import BackgroundServer, ServerConfig


@pytest.fixture(scope="module")
def engine(smollm_path) -> Iterator:
    from radixserve import Engine

    eng = Engine(str(smollm_path), device="cpu", check_invariants=True, max_running_requests=32)
    yield eng
    assert_no_leak(eng)
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine, ServerConfig(port=0)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def leak_check(engine) -> Iterator[None]:
    yield
    assert_no_leak(engine)


def http(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or text); HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, payload = err.code, dict(err.headers), err.read()
    text = payload.decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an event stream: JSON objects, and the final "[DONE]"."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
