"""The server's transport under hostile clients: slow or idle connections, the drain cut, logs, media types.

Slow clients talk to a real server on loopback through raw sockets, with
timeouts of a second or two, and every loop is bounded: an idle connection, a
request head sent a byte at a time and a body sent a byte at a time must each
be closed within its configured timeout. At shutdown, a stream still running
after `--drain-timeout` must end within about that time, with an error event
and `[DONE]`. Access log lines escape whatever the client sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time

import pytest
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.server import BackgroundServer, ServerConfig

M = "smollm2-135m-instruct"
KEEP_ALIVE, HEADER, BODY = 1.0, 2.0, 1.5  # header > keep-alive: a head's first byte stops the idle timer
SLACK = 1.0  # scheduling on a shared 2-core machine


@pytest.fixture(scope="module")
def fast(engine):
    config = ServerConfig(port=0, keep_alive_timeout=KEEP_ALIVE, header_timeout=HEADER, body_timeout=BODY)
    with BackgroundServer(engine, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(engine):
    with BackgroundServer(engine, ServerConfig(port=0, api_key="k")) as srv:
        yield srv


def _connect(srv: BackgroundServer) -> socket.socket:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(0.05)
    return sock


def _trickle(
    sock: socket.socket, data: bytes, first: bytes = b"", interval: float = 0.05, limit: float = 10.0
) -> tuple[float, bytes]:
    """Send `first`, then `data` a byte at a time (then nothing) until the server closes the connection.

    Returns (seconds from the start, bytes received). Gives up after `limit` seconds (the
    connection is still open then: the caller's assertion fails).
    """
    start, got, i = time.monotonic(), b"", 0
    try:
        sock.sendall(first)
        while time.monotonic() - start < limit:
            if i < len(data):
                sock.send(data[i:i + 1])
                i += 1
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                time.sleep(interval)
                continue
            if not chunk:
                break
            got += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return time.monotonic() - start, got


def _request(
    path: str, body: bytes = b"", content_type: str | None = "application/json", method: str = "POST"
) -> bytes:
    """A raw HTTP/1.1 request."""
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_an_idle_connection_is_closed(fast):
    took, got = _trickle(_connect(fast), b"")
    assert got == b"" and KEEP_ALIVE - 0.2 <= took <= KEEP_ALIVE + SLACK


def test_a_connection_idle_after_a_response_is_closed(fast):
    sock = _connect(fast)
    sock.sendall(_request("/health", method="GET"))
    took, got = _trickle(sock, b"")
    assert got.startswith(b"HTTP/1.1 200") and took <= KEEP_ALIVE + SLACK


def test_a_header_trickle_is_closed(fast):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 1000  # never finished
    took, got = _trickle(_connect(fast), head)
    # The head timer, not the idle one, closed it: bytes were arriving past the keep-alive timeout.
    assert got == b"" and HEADER - 0.2 <= took <= HEADER + SLACK


def test_a_body_trickle_gets_408_and_is_closed(fast):
    body = json.dumps({"model": M, "prompt": "Hello " * 100, "max_tokens": 1}).encode()
    req = _request("/v1/completions", body)
    took, got = _trickle(_connect(fast), req[-len(body):], first=req[:-len(body)])
    assert took <= BODY + SLACK, took
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    assert json.loads(payload)["error"]["code"] == "request_timeout"


def test_an_unread_body_trickle_is_closed(fast):
    """A route that never reads the body answers at once; the trickle behind it is cut at the body timeout."""
    req = _request("/health", b"x" * 1000, method="GET")
    took, got = _trickle(_connect(fast), req[-1000:], first=req[:-1000])
    assert got.startswith(b"HTTP/1.1 200") and took <= BODY + SLACK


def test_prompt_clients_are_unaffected(fast):
    sock = _connect(fast)
    body = json.dumps({"model": M, "prompt": "Hello", "max_tokens": 1}).encode()
    for _ in range(2):  # two requests on one keep-alive connection, a body in two parts
        req = _request("/v1/completions", body)
        sock.sendall(req[:-5])
        time.sleep(0.3)
        sock.sendall(req[-5:])
        got = b""
        deadline = time.monotonic() + 60
        while b'"usage"' not in got and time.monotonic() < deadline:
            try:
                got += sock.recv(65536)
            except TimeoutError:
                pass
        assert got.startswith(b"HTTP/1.1 200") and b'"completion_tokens": 1' in got
        time.sleep(KEEP_ALIVE / 2)
    sock.close()


def test_a_client_that_stops_reading_is_cut_off(engine, caplog):
    """A client that takes nothing of its answers while they fill every buffer is dropped after send_timeout."""
    with BackgroundServer(engine, ServerConfig(port=0, send_timeout=1.0)) as srv, \
            caplog.at_level(logging.DEBUG, logger="radixserve.server.transport"):
        body = json.dumps({"model": M, "input": [f"text {i}" for i in range(100)]}).encode()  # ~1.3 MB of floats back
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(_request("/v1/embeddings", body) * 10)  # more than the kernel's buffers take
        deadline = time.monotonic() + 120
        while not any("read nothing" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("read nothing of its answer for 1 s" in r.getMessage() for r in caplog.records)
        got = b""
        sock.settimeout(10)  # still open after that: a socket.timeout fails the test
        try:
            while chunk := sock.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass
        sock.close()
        assert got.count(b"HTTP/1.1 200") < 10
        while srv.state.inflight and time.monotonic() < deadline:  # the handler was cancelled, not left waiting
            time.sleep(0.05)
        assert srv.state.inflight == 0 and srv.state.pending == 0


def test_connection_deadlines_use_aiohttp_internals_that_exist():
    """`_Connection` relies on four attributes of aiohttp's RequestHandler; fail loudly if one goes away."""
    import inspect

    from aiohttp.web_protocol import RequestHandler

    source = inspect.getsource(RequestHandler)
    for name in ("_request_count", "_request_in_progress", "_messages", "_keepalive"):
        assert f"self.{name} " in source or f"self.{name}:" in source, name


# -- media type ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1"])
def test_a_json_route_refuses_other_media_types(fast, content_type):
    body = json.dumps({"model": M, "prompt": "Hello", "max_tokens": 1}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/generate"):
        sock = _connect(fast)
        sock.settimeout(10)
        sock.sendall(_request(path, body, content_type))
        head, _, payload = sock.recv(65536).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 415"), head
        err = json.loads(payload)["error"]
        assert err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"


def test_json_with_a_charset_is_accepted(server):
    status, _, body = http(server.url + "/v1/completions", "POST", {"model": M, "prompt": "Hi", "max_tokens": 1},
                           headers={"Content-Type": "application/json; charset=UTF-8"})
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_415_comes_after_the_api_key(engine):
    with BackgroundServer(engine, ServerConfig(port=0, api_key="k")) as srv:
        for token in (b"\xff\xfe", "é".encode(), b"k\x80"):  # header bytes that are not UTF-8, or not ASCII
            sock = _connect(srv)
            sock.settimeout(10)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + token + b"\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 401"), token
            sock.close()
        plain = {"Content-Type": "text/plain"}
        assert http(srv.url + "/v1/completions", "POST", {}, headers=plain)[0] == 401
        status, _, err = http(srv.url + "/v1/completions", "POST", {}, headers={**plain, "Authorization": "Bearer k"})
        assert status == 415 and err["error"]["code"] == "unsupported_media_type"


# -- access log ------------------------------------------------------------------------------


def test_access_log_escapes_what_the_client_sent(server, caplog):
    ua = b'curl" 200 0 "-" "x\t\xff\xc3\xa9\\'  # quotes to forge fields, a tab, bad UTF-8, non-ASCII, a backslash
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        sock = _connect(server)
        sock.settimeout(10)
        sock.sendall(b'GET /health?q="a" HTTP/1.1\r\nHost: t\r\nReferer: r" "\r\nUser-Agent: ' + ua + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        deadline = time.monotonic() + 10
        while not any("/health?q=" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if "/health?q=" in r.getMessage())
    assert line.isascii() and line.isprintable(), line
    fields = re.fullmatch(r'(\S+) "((?:[^"\\]|\\.)*)" (\d+) (\d+) (\S+) "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"', line)
    assert fields is not None, line
    assert fields.group(2) == 'GET /health?q=\\"a\\" HTTP/1.1' and fields.group(3) == "200"
    assert fields.group(6) == 'r\\" \\"'
    assert fields.group(7) == 'curl\\" 200 0 \\"-\\" \\"x\\t\\udcff\\xe9\\\\'


def test_a_malformed_request_is_a_400_and_no_error_log(server, caplog):
    with caplog.at_level(logging.DEBUG):
        sock = _connect(server)
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Bad: a\x01b\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.0 400")
        sock.close()
        deadline = time.monotonic() + 10
        while not any("malformed request" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert any("malformed request" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


HEADER_BYTES = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from([b"/v1/completions", b"/v1/chat/completions", b"/v1/embeddings", b"/generate"]),
    content_type=st.one_of(st.just(b"application/json"), HEADER_BYTES.map(lambda b: b"application/json;" + b),
                           HEADER_BYTES),
    header=st.sampled_from([b"Authorization", b"User-Agent", b"Referer", b"Accept", b"X-Anything"]),
    value=HEADER_BYTES,
    body=st.one_of(st.binary(max_size=48), st.sampled_from([b'{"model": "\\ud800"}', b'"\xed\xa0\x80"',
                                                              b'{"prompt": "\\udc00", "model": 1}'])),
)
def test_no_bytes_make_a_5xx(server, keyed, path, content_type, header, value, body):
    """Whatever bytes a client puts in its headers or body, the answer is a 4xx, never a 5xx."""
    req = (b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: " + content_type + b"\r\n" + header + b": "
           + value + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    sock = _connect(keyed if header == b"Authorization" else server)
    sock.settimeout(30)
    sock.sendall(req)
    status_line = sock.recv(65536).split(b"\r\n", 1)[0]
    sock.close()
    status = int(status_line.split()[1])
    assert 400 <= status < 500, (status_line, req)


# -- shutdown --------------------------------------------------------------------------------


def test_drain_timeout_cuts_a_stream_with_an_error_event(engine):
    drain = 1.0
    srv = BackgroundServer(engine, ServerConfig(port=0, drain_timeout=drain)).start()
    try:
        body = json.dumps({"model": M, "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": True,
                           "stream": True}).encode()
        sock = _connect(srv)
        sock.settimeout(60)
        sock.sendall(_request("/v1/completions", body))
        got = b""
        while b"data: " not in got:  # the stream is running
            got += sock.recv(65536)
        stopper = threading.Thread(target=srv.stop)
        start = time.monotonic()
        stopper.start()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        took = time.monotonic() - start
        sock.close()
        stopper.join(60)
    finally:
        srv.stop()
    assert drain - 0.1 <= took <= drain + SLACK, took
    head, _, stream = got.partition(b"\r\n\r\n")
    # Chunked transfer encoding: keep the lines that are events.
    events = sse_events("\n".join(line for line in stream.decode().splitlines() if line.startswith("data: ")))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "shutting_down" and events[-2]["error"]["type"] == "server_error"
    assert all("choices" in e for e in events[:-2]) and len(events) > 3
    assert engine.wait_idle(30)


def test_drain_timeout_cuts_a_plain_request_with_503(engine):
    srv = BackgroundServer(engine, ServerConfig(port=0, drain_timeout=0.5)).start()
    result: dict = {}

    def ask() -> None:
        result["answer"] = http(srv.url + "/v1/completions", "POST", {
            "model": M, "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": True})
        result["at"] = time.monotonic()

    try:
        client = threading.Thread(target=ask)
        client.start()
        deadline = time.monotonic() + 60
        while engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.monotonic()
        srv.stop()
        client.join(60)
    finally:
        srv.stop()
    status, headers, err = result["answer"]
    assert status == 503 and err["error"]["code"] == "shutting_down", err
    assert result["at"] - start <= 0.5 + SLACK, result["at"] - start
    assert engine.wait_idle(30)


# -- API key from the environment or a file ----------------------------------------------------


def test_api_key_sources(tmp_path, monkeypatch):
    from radixserve.cli import api_key, build_parser

    def key(*argv: str) -> str | None:
        return api_key(build_parser().parse_args(["serve", *argv]))

    monkeypatch.delenv("RADIXSERVE_API_KEY", raising=False)
    assert key() is None
    monkeypatch.setenv("RADIXSERVE_API_KEY", "from-env")
    assert key() == "from-env"
    path = tmp_path / "key"
    path.write_text("from-file\n")
    assert key("--api-key-file", str(path)) == "from-file"  # the file wins over the variable
    assert key("--api-key", "from-argv") == "from-argv"
    with pytest.raises(SystemExit):  # one or the other
        key("--api-key", "a", "--api-key-file", str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match="api_key_file"):
        key("--api-key-file", str(path))
    with pytest.raises(ValueError, match="api_key_file"):
        key("--api-key-file", str(tmp_path / "missing"))


def test_serve_reads_the_api_key_from_a_file(smollm_path, tmp_path):
    import queue
    import subprocess
    import sys

    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    env = dict(os.environ, RADIXSERVE_API_KEY="from-env")
    cmd = [sys.executable, "-m", "radixserve", "serve", "--model", str(smollm_path), "--device", "cpu",
           "--port", "0", "--api-key-file", str(key_file), "--max-running-requests", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")], daemon=True).start()
    try:
        url, seen = None, []
        deadline = time.monotonic() + 180
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))  # queue.Empty past the deadline
            assert line, "".join(seen)
            seen.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, "".join(seen)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"s3cret" not in f.read()  # what `ps` shows
        assert http(url + "/v1/models")[0] == 401
        assert http(url + "/v1/models", headers={"Authorization": "Bearer from-env"})[0] == 401
        status, _, body = http(url + "/v1/models", headers={"Authorization": "Bearer s3cret-from-file"})
        assert status == 200 and body["data"][0]["object"] == "model"
    finally:
        proc.terminate()
        proc.wait(60)
