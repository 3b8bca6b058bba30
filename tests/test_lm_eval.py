"""lm-evaluation-harness against a real server: its `local-completions` model runs a small
log-likelihood task (a YAML config and a JSONL data set written here) over /v1/completions, and
every document's score equals the one the engine computes itself from the same tokens (prompt
logprobs, which tests/test_prompt_logprobs.py checks against transformers).

lm-eval is a declared test dependency (the `test` extra): where it is missing this test fails.
Nothing reaches the network: the data set is a local file, the tokenizer the built-in model's
directory, and the Hugging Face libraries run offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.server import engine, leak_check, server  # noqa: F401 (fixtures)

from radixserve import SamplingParams

TASK = "radixserve_tiny_loglikelihood"
DOCS = [
    {"context": "Question: What is the capital of France?\nAnswer:", "continuation": " Paris"},
    {"context": "Question: What is the capital of France?\nAnswer:", "continuation": " Berlin"},
    {"context": "One, two, three,", "continuation": " four, five"},
    {"context": "The sky is", "continuation": " blue"},
    {"context": "The opposite of hot is", "continuation": " cold"},
    {"context": "def add(a, b):\n   ", "continuation": " return a + b"},
]


def write_task(root: Path) -> None:
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    # JSON is YAML: the config needs no YAML writer.
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (root / f"{TASK}.yaml").write_text(json.dumps(config, indent=2))


def engine_scores(engine, context: str, continuation: str) -> tuple[float, bool]:
    """(log-likelihood of the continuation, whether each of its tokens is the argmax), from the
    engine's own prompt logprobs over the tokens lm-eval sends (its causal split: the whole text
    encoded, the context's tokens first; a context's trailing spaces move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = engine.tokenizer
    whole = tok.encode(context + continuation)
    ctxlen = len(tok.encode(context))
    (out,) = engine.generate([whole], SamplingParams(max_tokens=0, prompt_logprobs=1), progress=False)
    entries = out.prompt_logprobs[ctxlen:]
    assert len(entries) == len(whole) - ctxlen > 0
    return sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)


def test_local_completions_runs_a_loglikelihood_task(server, engine, tmp_path, monkeypatch, smollm_path):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    write_task(tmp_path)

    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": server.state.model_name, "base_url": server.url + "/v1/completions",
                    "tokenizer": str(smollm_path), "tokenizer_backend": "huggingface", "tokenized_requests": True,
                    "num_concurrent": 2, "max_retries": 1},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    assert results is not None
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == DOCS
    want = [engine_scores(engine, d["context"], d["continuation"]) for d in DOCS]
    for sample, (ll, greedy) in zip(samples, want):
        ((got_ll, got_greedy),) = sample["filtered_resps"]
        assert float(got_ll) == pytest.approx(ll, abs=1e-3), sample["doc"]
        assert bool(got_greedy) == greedy, sample["doc"]
    # A real answer scores above a wrong one, and the aggregates are lm-eval's over the same numbers.
    assert want[0][0] > want[1][0]
    metrics = results["results"][TASK]
    assert metrics["acc,none"] == pytest.approx(sum(g for _, g in want) / len(want))
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in want) / len(want)), rel=1e-3)
