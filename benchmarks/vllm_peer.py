"""vLLM as a benchmark peer: the same checkpoint, token-id prompts and sampling settings
through vLLM's offline `LLM`, in a process of its own.

vLLM is never a dependency of radixserve. Its installation may need its own
`PYTHONPATH` (one that must not hold our FlashAttention-4 folder), so the
benchmarks do not import it: `run_peer` writes the prompts and settings to a JSON
file and starts this file as a script under that path; the script (`main`) runs
them and writes one JSON object with its timing and token counts.

The peer runs with prefix caching on and vLLM's defaults otherwise (its own
batch and chunk sizes, torch.compile, CUDA graphs), `skip_tokenizer_init=True`
(random-weight checkpoints have no tokenizer) and `detokenize=False`. Requests
are submitted at once, after a warm-up of a few short requests and a reset of
its prefix cache, as our engine's runs do. Requests carry no per-request seed:
seeded requests take a slower sampling path in vLLM, and the comparison is of
speed. Every request has `ignore_eos` and `max_tokens`, so both engines produce
exactly the requested tokens (checked by the callers). Greedy tokens of a few
`check` prompts come back for a sanity comparison (`token_agreement`).

    # standalone (normally run_peer starts it):
    PYTHONPATH=/tmp/vl VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \\
        python3 benchmarks/vllm_peer.py --job job.json --result result.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Lines vLLM logs when it attends with FlashAttention 3 (the fast path on SM 9.0); a fall-back
# (Triton attention, say) would understate vLLM, so the callers report whether both were seen.
BACKEND_LINES = ("Using FLASH_ATTN attention backend", "FlashAttention version 3")
PEER_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}


def run_peer(
    ckpt: Path, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], *, temperature: float,
    dtype: str, vllm_path: str, check_prompts: Sequence[Sequence[int]] = (), check_tokens: int = 32,
    log_path: Path | None = None, timeout_s: float = 1800, kv_cache_dtype: str = "auto",
) -> dict[str, Any]:
    """Run the prompts through vLLM in a subprocess whose PYTHONPATH is `vllm_path` alone.
    Returns the peer's result (see `main`), plus the log's attention-backend lines; on any
    failure, {"error": ..., "log_tail": ...} instead of raising, so that a benchmark still
    reports our own numbers. `kv_cache_dtype` is vLLM's own option ("auto", "fp8_e4m3"):
    an fp8 run of ours meets an fp8 run of vLLM's."""
    if len(prompts) != len(max_tokens):
        raise ValueError(f"prompts ({len(prompts)}) and max_tokens ({len(max_tokens)}) differ in length")
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        log = log_path or Path(tmp) / "vllm.log"
        job.write_text(json.dumps({
            "model": str(ckpt), "dtype": dtype, "temperature": temperature, "kv_cache_dtype": kv_cache_dtype,
            "prompts": [list(map(int, p)) for p in prompts], "max_tokens": [int(n) for n in max_tokens],
            "check_prompts": [list(map(int, p)) for p in check_prompts], "check_tokens": check_tokens,
        }))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | PEER_ENV | {"PYTHONPATH": vllm_path}
        # -P: the script's folder (benchmarks/) stays off sys.path, so nothing of ours shadows vLLM's imports.
        cmd = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), str(Path(__file__).resolve()),
               "--job", str(job), "--result", str(result)]
        started = time.perf_counter()
        try:
            with open(log, "w") as out:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            text = log.read_text(errors="replace")
            if proc.returncode != 0 or not result.exists():
                return {"error": f"vLLM peer exited with {proc.returncode}", "log_tail": text[-4000:]}
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = log.read_text(errors="replace") if log.exists() else ""
            return {"error": repr(exc), "log_tail": text[-4000:]}
        record = json.loads(result.read_text())
    record["process_s"] = time.perf_counter() - started
    record["log_backend_lines"] = {line: line in text for line in BACKEND_LINES}
    record["log_attention_lines"] = [
        ln.strip()[-160:] for ln in text.splitlines() if "attention backend" in ln.lower() or "FlashAttention" in ln
    ][:6]
    return record


def token_agreement(ours: Sequence[Sequence[int]], peer: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Greedy outputs of the same prompts: how many are identical, and how many leading tokens
    each pair shares (bf16 rounding differs between engines, so late divergence is expected)."""
    common = []
    for a, b in zip(ours, peer):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        common.append(n)
    return {
        "sequences": len(common), "identical": sum(len(a) == len(b) == c for a, b, c in zip(ours, peer, common)),
        "common_prefix_tokens": common, "tokens_each": [len(a) for a in ours],
    }


def main() -> None:
    """The peer process: runs a job file written by `run_peer` and writes its result."""
    p = argparse.ArgumentParser(description="Run a benchmark job through vLLM's offline LLM")
    p.add_argument("--job", required=True, help="JSON from run_peer: model, dtype, prompts, max_tokens, ...")
    p.add_argument("--result", required=True, help="where to write the result JSON")
    args = p.parse_args()
    job = json.loads(Path(args.job).read_text())

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], skip_tokenizer_init=True, enable_prefix_caching=True,
              kv_cache_dtype=job.get("kv_cache_dtype", "auto"))
    start_s = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

    def sampling(n: int, temperature: float) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=True, detokenize=False)

    # Warm-up on the first few prompts, then an empty cache, as our engine's runs do.
    llm.generate(prompts[:8], [sampling(8, job["temperature"])] * min(8, len(prompts)), use_tqdm=False)
    llm.reset_prefix_cache()
    params = [sampling(n, job["temperature"]) for n in job["max_tokens"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in job["prompts"])
    cached = [getattr(o, "num_cached_tokens", None) for o in outs]
    check = []
    if job["check_prompts"]:
        llm.reset_prefix_cache()
        greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["check_prompts"]],
                              sampling(job["check_tokens"], 0.0), use_tqdm=False)
        check = [list(o.outputs[0].token_ids) for o in greedy]
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    record = {
        "engine": f"vllm {vllm.__version__}",
        "kv_cache_dtype": str(getattr(llm.llm_engine.vllm_config.cache_config, "cache_dtype", None)),
        "max_num_seqs": getattr(scheduler, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(scheduler, "max_num_batched_tokens", None),
        "start_s": start_s,
        "time_s": seconds,
        "requests": len(outs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "requested_output_tokens": sum(job["max_tokens"]),
        "output_tok_s": output_tokens / seconds,
        "prompt_tok_s": prompt_tokens / seconds,
        "total_tok_s": (prompt_tokens + output_tokens) / seconds,
        "cache_hit_rate": sum(cached) / prompt_tokens if None not in cached else None,
        "check_greedy_tokens": check,
    }
    Path(args.result).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
