"""The fuzz draws of tests/test_fuzz_requests.py, sent through the router to a real server, and
drawn admin requests: every answer is a 2xx or a 4xx with an OpenAI-style error body (a bad
prompt is the replica's 400, never a router's 500), and the router keeps routing."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator

import pytest
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_requests import ROUTES, M, _check_answer, _request

from radixserve.router import BackgroundRouter, RouterConfig
from radixserve.server import ServerConfig

URLS = st.sampled_from([None, 5, "", "ftp://x", "http://", "http://[::1", "\ud800", "http://h:99999", ["http://a"],
                        "http://127.0.0.1:9/x?y=1", "http://127.0.0.1:9", "https://example.invalid:8000/"])


@pytest.fixture(scope="module")
def router(server) -> Iterator[BackgroundRouter]:
    config = RouterConfig(replicas=(server.url,), health_interval=0.5, server=ServerConfig(port=0))
    with BackgroundRouter(config) as r:
        yield r


def _routes_fine(router, engine) -> None:
    status, _, body = http(router.url + "/v1/completions", "POST",
                           {"model": M, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 1, body
    assert http(router.url + "/health")[0] == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.sampled_from(ROUTES).flatmap(_request))
def test_drawn_requests_through_the_router(router, engine, drawn):
    route, body = drawn
    status, headers, answer = http(router.url + route, "POST", raw=json.dumps(body).encode())
    _check_answer(status, headers, answer, streamed=body.get("stream") is True)
    _routes_fine(router, engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=URLS, method=st.sampled_from(["POST", "DELETE"]), in_query=st.booleans())
def test_drawn_admin_requests(router, server, engine, url, method, in_query):
    if in_query and isinstance(url, str):
        query = urllib.parse.quote(url, safe="", errors="surrogatepass")
        status, headers, answer = http(router.url + "/router/replicas?url=" + query, method, raw=b"")
    else:
        status, headers, answer = http(router.url + "/router/replicas", method, {"url": url})
    _check_answer(status, headers, answer, streamed=False)
    listed = http(router.url + "/router/replicas")[2]["replicas"]
    for replica in listed:  # put the set back as it was: the one real server
        if replica["url"] != server.url:
            assert http(router.url + "/router/replicas?url=" + urllib.parse.quote(replica["url"]), "DELETE")[0] == 200
    _routes_fine(router, engine)
