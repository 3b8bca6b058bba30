"""`radixserve serve --dp N --device cuda`: one replica per GPU, each seeing only its own device.

With fewer than two GPUs, asking for more replicas than GPUs is refused before any replica starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_one_replica_per_gpu(smollm_path):
    n = torch.cuda.device_count()
    if n < 2:
        proc = subprocess.run([sys.executable, "-m", "radixserve", "serve", "--dp", str(n + 1), "--device", "cuda",
                               "--model", str(smollm_path), "--port", "0"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and f"{n + 1} replicas need {n + 1} GPU groups" in proc.stderr, proc.stderr
        return
    cmd = [sys.executable, "-m", "radixserve", "serve", "--dp", "2", "--device", "cuda", "--model", str(smollm_path),
           "--port", "0", "--served-model-name", "demo"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pids, url, seen = [], None, []
        deadline = time.monotonic() + 600
        while url is None:
            assert time.monotonic() < deadline, "".join(seen[-40:])
            line = proc.stdout.readline()
            assert line, "".join(seen[-40:])
            seen.append(line)
            if m := re.match(r"radixserve: replica \d at \S+ \(pid (\d+)\)", line):
                pids.append(int(m.group(1)))
            if m := re.match(r"radixserve: serving demo at (http://\S+) \(2 replicas on GPUs", line):
                url = m.group(1)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        want = visible.split(",")[:2] if visible else ["0", "1"]
        assert [_environ(pid)["CUDA_VISIBLE_DEVICES"] for pid in pids] == want
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 16, "temperature": 0}).encode()
        for _ in range(2):
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert "Paris" in json.loads(resp.read())["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
