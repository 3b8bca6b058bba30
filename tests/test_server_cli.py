"""`radixserve serve` as a process: it prints where it listens and a curl example, and SIGTERM drains.

On SIGTERM the server stops accepting connections, lets the in-flight stream
finish (every token, then [DONE]) and exits 0.
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
import urllib.error
import urllib.request

import pytest


def _read_lines(proc: subprocess.Popen, out: queue.Queue) -> None:
    for line in proc.stdout:
        out.put(line)
    out.put(None)


def test_bad_option_fails_before_loading_the_model():
    proc = subprocess.run([sys.executable, "-m", "radixserve", "serve", "--port", "70000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "port must be" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "radixserve", "serve", "--responses-store-size", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "responses_store_size must be" in proc.stderr


def test_serve_prints_a_curl_example_and_sigterm_drains(smollm_path):
    env = dict(os.environ, RADIXSERVE_API_KEY="")
    cmd = [sys.executable, "-m", "radixserve", "serve", "--model", str(smollm_path), "--device", "cpu",
           "--port", "0", "--max-running-requests", "4", "--served-model-name", "demo"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
    try:
        seen, url = [], None
        deadline = time.monotonic() + 180
        while url is None or not any(line.lstrip().startswith("-d '") for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)
            seen.append(line)
            match = re.search(r"serving demo at (http://127\.0\.0\.1:\d+)", line)
            url = url or (match.group(1) if match else None)
        assert f"curl {url}/v1/chat/completions" in "".join(seen)
        printed = re.search(r"-d '(\{.*\})'", "".join(seen)).group(1)
        req = urllib.request.Request(url + "/v1/chat/completions", data=printed.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:  # the first thing a new user sees
            answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer

        body = json.dumps({"model": "demo", "prompt": "Tell me a story.", "max_tokens": 12, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            first = resp.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = resp.read().decode()
        events = [e[len("data: "):] for e in (first.decode() + rest).split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=120) == 0
        with pytest.raises(urllib.error.URLError):  # nothing listens any more
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_options_reach_the_engine_config():
    """The command line's engine flags become EngineConfig fields (none parsed and dropped)."""
    import argparse

    from radixserve.engine.config import EngineConfig
    from radixserve.engine.options import add_engine_options, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_options(p)
    kw = engine_kwargs(p.parse_args([
        "--piecewise-max-rows", "512", "--no-piecewise-graphs", "--no-cascade-attention", "--kv-cache-tokens", "4096",
    ]))
    config = EngineConfig(**kw)
    assert (config.piecewise_max_rows, config.piecewise_graphs, config.cascade_attention, config.kv_cache_tokens) == (
        512, False, False, 4096)
    assert EngineConfig(**engine_kwargs(p.parse_args([]))).piecewise_max_rows is None


def test_every_engine_config_field_has_a_flag_that_reaches_it():
    """One flag per EngineConfig field, made from the field: a value given on the command line arrives
    in the config, and a flag left out leaves the dataclass's default (the only default)."""
    import argparse
    import dataclasses

    from radixserve.engine.config import EngineConfig
    from radixserve.engine.options import add_engine_options, engine_kwargs

    values = {  # a valid value other than the default, for every field
        "model": "/models/x", "device": "cpu", "dtype": "bfloat16", "enable_prefix_cache": False,
        "max_running_requests": 7, "max_prefill_tokens": 99, "kv_cache_tokens": 1234, "gpu_memory_utilization": 0.5,
        "kv_cache_dtype": "fp8_e4m3",
        "max_context": 300, "eviction_policy": "lfu", "schedule_policy": "lpm", "lpm_aging_tokens_per_step": 3,
        "page_size": 4, "fold_mode": "mlp", "fold_threshold": 0.5, "batch_order": "arrival",
        "attention_backend": "torch", "cuda_graphs": False, "piecewise_graphs": False, "piecewise_max_rows": 64,
        "overlap_schedule": True, "fused_kernels": False, "cascade_attention": True, "cascade_min_prefix": 32,
        "triton_decode": False, "moe_backend": "loop", "max_logprobs": -1, "seed": 11, "check_invariants": True,
        "show_progress": False,
        "tensor_parallel_size": 4, "nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:29500",
        "dist_timeout": 12.5,
    }
    assert set(values) == {f.name for f in dataclasses.fields(EngineConfig)}
    p = argparse.ArgumentParser()
    add_engine_options(p)
    argv = []
    flags = {a.dest: a.option_strings for a in p._actions}
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(next(s for s in flags[name] if s.startswith("--no-") != value))
        else:
            argv += [flags[name][0], str(value)]
    config = EngineConfig(**engine_kwargs(p.parse_args(argv)))
    assert {name: getattr(config, name) for name in values} == values
    assert EngineConfig(**engine_kwargs(p.parse_args([]))) == EngineConfig()
    with pytest.raises(SystemExit):
        p.parse_args(["--fold-mode", "sideways"])  # choices come from the enumeration
