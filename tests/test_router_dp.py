"""`radixserve serve --dp 2` on the CPU: two replica processes behind the router on the serve port.

It answers through the router; a replica killed mid-stream ends that stream with an error event
and [DONE], the requests after it are answered by the other replica, the dead one is started
again and rejoins; SIGTERM stops the router and every replica.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from helpers.server import http

KEY = "dp-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _read_lines(proc: subprocess.Popen, out: queue.Queue) -> None:
    for line in proc.stdout:
        out.put(line)
    out.put(None)


def _wait_line(lines: queue.Queue, seen: list[str], pattern: str, timeout: float = 240.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(seen[-40:])
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_dp_two_cpu_replicas(smollm_path):
    env = dict(os.environ, RADIXSERVE_API_KEY=KEY, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "radixserve", "serve", "--dp", "2", "--model", str(smollm_path), "--device", "cpu",
           "--port", "0", "--max-running-requests", "4", "--served-model-name", "demo", "--health-interval", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    pids: dict[str, int] = {}
    try:
        for _ in range(2):
            m = _wait_line(lines, seen, r"^radixserve: replica (\d) at (http://\S+) \(pid (\d+)\)")
            pids[m.group(2)] = int(m.group(3))
        url = _wait_line(lines, seen, r"^radixserve: serving demo at (http://127\.0\.0\.1:\d+) \(2 replicas").group(1)
        assert len(pids) == 2 and all(_alive(p) for p in pids.values())
        for pid in pids.values():  # the key reaches the replicas by their environment, never a command line
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"RADIXSERVE_API_KEY={KEY}".encode() in environ
            assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

        status, _, answer = http(url + "/v1/chat/completions", "POST", {
            "model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}, headers=AUTH)
        assert status == 200 and "Paris" in answer["choices"][0]["message"]["content"]
        assert http(url + "/v1/models")[0] == 401  # the key is enforced at the router
        status, _, listed = http(url + "/router/replicas", headers=AUTH)
        assert status == 200 and {r["url"] for r in listed["replicas"]} == set(pids)
        assert all(r["healthy"] for r in listed["replicas"])

        # Kill the replica serving a stream after its first event.
        body = json.dumps({"model": "demo", "prompt": "Tell me a long story.", "max_tokens": 400,
                           "ignore_eos": True, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", **AUTH})
        with urllib.request.urlopen(req, timeout=120) as resp:
            victim = resp.headers["X-Radixserve-Replica"]
            first = resp.readline()
            assert first.startswith(b"data: ")
            os.kill(pids[victim], signal.SIGKILL)
            rest = resp.read().decode()
        events = [e[len("data: "):] for e in (first.decode() + rest).split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "replica_failed"

        survivor = next(u for u in pids if u != victim)
        for i in range(3):  # whatever the router knew of the victim, these are answered elsewhere
            status, headers, answer = http(url + "/v1/completions", "POST", {
                "model": "demo", "prompt": f"Tell me a long story. Part {i}", "max_tokens": 2}, headers=AUTH)
            assert status == 200 and headers["X-Radixserve-Replica"] != victim, answer

        # The dead replica is reported, started again on a new port, and rejoins.
        _wait_line(lines, seen, rf"replica \d \(pid {pids[victim]}, {re.escape(victim)}\) exited with status -9")
        restarted = _wait_line(lines, seen, r"replica \d restarted at (http://\S+) \(pid (\d+)\)")
        back = restarted.group(1)

        def joined() -> bool:
            replicas = {r["url"]: r for r in http(url + "/router/replicas", headers=AUTH)[2]["replicas"]}
            return victim not in replicas and replicas.get(back, {}).get("healthy", False)

        deadline = time.monotonic() + 60
        while not joined():
            assert time.monotonic() < deadline, "the restarted replica did not rejoin"
            time.sleep(0.2)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert not _alive(pids[survivor]) and not _alive(int(restarted.group(2)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_routing_options_need_dp_and_bad_values_fail_before_any_replica():
    for argv, message in [
        (["serve", "--policy", "round_robin"], "--policy: routing options need --dp N"),
        (["serve", "--dp", "0"], "dp must be >= 1"),
        (["serve", "--dp", "2", "--device", "cpu", "--cache-threshold", "2"], "cache_threshold must be in [0, 1]"),
        (["router", "--replica", "ftp://x"], "url must be an http(s) URL"),
        (["router", "--health-interval", "0"], "health_interval must be"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "radixserve", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr)
