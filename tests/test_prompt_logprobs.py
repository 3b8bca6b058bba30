"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers (fp32, CPU): every prompt
token's logprob, rank and top k equal log_softmax of the model's forward over the whole prompt,
whatever the prefix cache holds (cold, the same prompt again, a prompt sharing a cached prefix),
with chunked prefill, folding and overlapped scheduling; max_tokens 0; the whole vocabulary (-1)."""

from __future__ import annotations

import pytest
import torch

from radixserve import SamplingParams
from radixserve.model_runner import model_runner as runner_module
from radixserve.model_runner.model_runner import ModelRunner
from radixserve.scheduler.request import Req

TOL = 1e-4
BASE = [5, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]
PROMPTS = [BASE, BASE + [47, 53, 59], BASE[:6] + [61, 67, 71, 73], [79, 83, 89]]


@pytest.fixture(scope="module")
def hf_tiny(tiny_qwen3_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm_path), dtype=torch.float32).eval()


def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log_softmax of transformers' logits at positions 0 .. len - 2."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(out, model, k: int) -> None:
    """`out.prompt_logprobs` against the reference: None first, then each token's logprob within
    TOL, its rank between the ranks the reference allows within TOL, and the top k's values."""
    ids = out.prompt_token_ids
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(ids) and lps[0] is None
    ref = reference(model, ids)
    for q, entry in enumerate(lps[1:]):
        row, target = ref[q], ids[q + 1]
        assert entry.token_id == target
        want = row[target].item()
        assert abs(entry.logprob - want) < TOL, (q, entry.logprob, want)
        assert int((row > want + TOL).sum()) + 1 <= entry.rank <= int((row >= want - TOL).sum())
        assert len(entry.top) == k
        if k:
            ref_top = row.topk(k).values
            got = torch.tensor([v for _, v in entry.top])
            assert (got - ref_top).abs().max().item() < TOL
            for token, value in entry.top:  # each listed token has the value it claims
                assert abs(row[token].item() - value) < TOL


def test_tiny_cold_warm_and_shared_prefix(tiny_engine, hf_tiny) -> None:
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    cold = tiny_engine.generate([PROMPTS[0]], params, progress=False)[0]
    check(cold, hf_tiny, 3)
    # The same prompt again: the tree holds all of it, and its logits are computed anyway.
    warm = tiny_engine.generate([PROMPTS[0]], params, progress=False)[0]
    check(warm, hf_tiny, 3)
    assert warm.cached_tokens == 0  # nothing was taken from the tree
    assert [e.logprob for e in warm.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in cold.prompt_logprobs[1:]], abs=TOL)
    # A prompt sharing the cached prefix, and one request without prompt logprobs that does use it.
    shared = tiny_engine.generate([PROMPTS[1]], params, progress=False)[0]
    check(shared, hf_tiny, 3)
    plain = tiny_engine.generate([PROMPTS[1]], SamplingParams(max_tokens=2, temperature=0), progress=False)[0]
    assert plain.prompt_logprobs is None and plain.cached_tokens > 0
    assert plain.token_ids == shared.token_ids


def test_smollm_matches_transformers(smollm_engine, hf_smollm) -> None:
    tok = smollm_engine.tokenizer
    texts = ["The capital of France is Paris, and the capital of Italy is", "The capital of France is"]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    for out in smollm_engine.generate(texts, params, progress=False):
        assert out.prompt_token_ids == tok.encode(out.prompt)
        check(out, hf_smollm, 2)


@pytest.mark.parametrize("opts", [
    pytest.param({"max_prefill_tokens": 5}, id="chunked"),
    pytest.param({"fold_mode": "tree", "fold_threshold": 1.0}, id="fold-tree"),
    pytest.param({"fold_mode": "mlp", "fold_threshold": 1.0}, id="fold-mlp"),
    pytest.param({"overlap_schedule": True, "max_prefill_tokens": 7}, id="overlap-chunked"),
    pytest.param({"enable_prefix_cache": False, "fold_mode": "tree", "fold_threshold": 1.0}, id="nocache-fold"),
])
def test_batches_give_each_request_its_own(make_engine, tiny_qwen3_path, hf_tiny, opts) -> None:
    """Several requests sharing prefixes in one batch (folded where the mode folds), some with
    prompt logprobs and some without; the second round finds the prompts cached."""
    engine = make_engine(tiny_qwen3_path, **opts)
    with_lps = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    without = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=1)
    params = [with_lps, with_lps, without, with_lps]
    reference_run = make_engine(tiny_qwen3_path, fold_mode="off", enable_prefix_cache=False)
    want = reference_run.generate(PROMPTS, without, progress=False)
    for _ in range(2):
        outs = engine.generate(PROMPTS, params, progress=False)
        for out, p, ref in zip(outs, params, want):
            assert out.token_ids == ref.token_ids  # outputs are what they are without prompt logprobs
            got = [lp.logprob for lp in out.logprobs]
            assert got == pytest.approx([lp.logprob for lp in ref.logprobs], abs=TOL)
            if p.prompt_logprobs is None:
                assert out.prompt_logprobs is None
            else:
                check(out, hf_tiny, 2)
    if opts.get("fold_mode") not in (None, "off"):
        assert engine.stats()["folded_tokens"] > 0


def test_max_tokens_zero_scores_the_prompt(tiny_engine, hf_tiny) -> None:
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    out = tiny_engine.generate([PROMPTS[2]], params, progress=False)[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    check(out, hf_tiny, 0)
    # n completions of nothing, streamed: one final delta each, prompt logprobs on completion 0's.
    deltas = list(tiny_engine.stream(PROMPTS[3], SamplingParams(max_tokens=0, n=2, prompt_logprobs=1)))
    assert sorted(d.index for d in deltas) == [0, 1]
    assert all(d.finish_reason == "length" and d.token_ids == () for d in deltas)
    with_lps = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_lps) == 1 and with_lps[0].index == 0 and len(with_lps[0].prompt_logprobs) == 3
    # Without prompt logprobs too: nothing sampled, the prompt is cached for later requests.
    out = tiny_engine.generate([PROMPTS[3]], SamplingParams(max_tokens=0), progress=False)[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.prompt_logprobs is None
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=0, min_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_one_token_prompt(tiny_engine) -> None:
    out = tiny_engine.generate([[7]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5),
                               progress=False)[0]
    assert out.prompt_logprobs == [None]


def test_whole_vocabulary(make_engine, tiny_qwen3_path, hf_tiny, tiny_engine) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        tiny_engine.generate([PROMPTS[3]], SamplingParams(max_tokens=1, prompt_logprobs=-1), progress=False)
    with pytest.raises(ValueError, match="logprobs"):
        tiny_engine.generate([PROMPTS[3]], SamplingParams(max_tokens=1, logprobs=21), progress=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-2)
    engine = make_engine(tiny_qwen3_path, max_logprobs=-1)
    vocab = engine.core.runner.vocab_size
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    out = engine.generate([PROMPTS[3]], params, progress=False)[0]
    check(out, hf_tiny, vocab)
    for lp in out.logprobs:
        assert len(lp.top) == vocab
        assert sum(torch.tensor([v for _, v in lp.top]).exp()).item() == pytest.approx(1.0, abs=1e-4)
        assert lp.top[0][0] == lp.token_id  # greedy: the sampled token is the argmax


def test_blocks_bound_memory(make_engine, tiny_qwen3_path, hf_tiny, monkeypatch) -> None:
    """A block of 3 rows at a time gives what one block gives."""
    engine = make_engine(tiny_qwen3_path)
    monkeypatch.setattr(runner_module, "SCORE_BLOCK_ELEMENTS", 3 * engine.core.runner.vocab_size)
    seen: list[int] = []
    logits = ModelRunner._logits

    def spy(self, hidden, rows):
        seen.append(int(rows.numel()))
        return logits(self, hidden, rows)

    monkeypatch.setattr(ModelRunner, "_logits", spy)
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=4), progress=False)[0]
    check(out, hf_tiny, 4)
    assert max(seen) == 3 and len(seen) >= len(PROMPTS[1]) // 3  # 14 scored rows in blocks of 3


@pytest.mark.parametrize("overlap", [False, True])
def test_failed_step_restarts_prompt_logprobs(make_engine, tiny_qwen3_path, hf_tiny, monkeypatch, overlap) -> None:
    """A step that fails once: the requests are reset and their prompt logprobs restart whole."""
    forward = ModelRunner.forward
    failures = [1]
    seen = []

    def flaky(self, batch):
        if failures and batch.score_rows is not None and batch.batch_size > 1:  # no request alone: none fails
            seen.append(1)
            if len(seen) == 3:  # the third such step: a request is part way through its prompt
                failures.pop()
                raise RuntimeError("injected failure in the model runner")
        return forward(self, batch)

    monkeypatch.setattr(ModelRunner, "forward", flaky)
    partial: list[int] = []  # prompt logprobs held by requests reset before they were complete
    reset = Req.reset_prompt_logprobs

    def spy(self):
        if self.prompt_logprobs_pending:
            partial.append(len(self.prompt_logprobs))
        reset(self)

    monkeypatch.setattr(Req, "reset_prompt_logprobs", spy)
    engine = make_engine(tiny_qwen3_path, max_prefill_tokens=6, overlap_schedule=overlap)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    outs = engine.generate(PROMPTS, params, progress=False)
    assert not failures and engine.stats()["failed_steps"] == 1
    assert any(n > 0 for n in partial)  # some were dropped part way, and computed again below
    for out in outs:
        assert out.finish_reason == "length"
        check(out, hf_tiny, 2)
