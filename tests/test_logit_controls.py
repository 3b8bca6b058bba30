"""logit_bias, allowed_token_ids and bad_words: in the sampler as batch tensors (the same as
adding them to the logits by hand, composed with every other processor), and on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from radixserve import SamplingParams
from radixserve.model_runner.sampler import SamplingBatch, SamplingRow, process_logits, sample
from radixserve.scheduler.scheduler import banned_by_bad_words

V = 40


def _row(params: SamplingParams, seed: int, output=(), suppress=()) -> SamplingRow:
    return SamplingRow(params, [3, 4, *output], list(output), seed, len(output), list(suppress))


def _offset_by_hand(params: SamplingParams) -> torch.Tensor:
    offset = torch.zeros(V)
    if params.allowed_token_ids is not None:
        offset[:] = -math.inf
        for t in params.allowed_token_ids:
            offset[t] = 0.0
    for t, b in params.logit_bias.items():
        offset[t] += b
    return offset


CONTROLLED = [
    SamplingParams(temperature=0.0, logit_bias={5: 7.5, 9: -100}),
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=6, allowed_token_ids=[1, 5, 8, 9, 30, 31, 32]),
    SamplingParams(temperature=1.3, top_p=0.8, logit_bias={2: 3.0, 30: -2.0}, allowed_token_ids=[2, 3, 30, 39],
                   presence_penalty=1.0, frequency_penalty=0.5),
    SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=1.4, logit_bias={4: 100.0}),
    SamplingParams(temperature=1.0, min_tokens=3, max_tokens=8, stop_token_ids=[8], logit_bias={8: 50.0}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_controls_equal_adding_the_offset_by_hand(seed):
    """Each row's controls composed with penalties, suppressed ids (min_tokens), temperature, top-k/p,
    min-p and its seed: the same tokens and processed logits as the offset added to the logits
    of a batch without controls. Logprobs stay the raw model's."""
    torch.manual_seed(seed)
    logits = torch.randn(len(CONTROLLED), V) * 3
    outputs = [(3, 3, 7), (), (1,), (2, 2, 30), (4,), (5,)]
    rows = [_row(p, 100 * seed + i, out, suppress=(8,) if p.min_tokens else ())
            for i, (p, out) in enumerate(zip(CONTROLLED, outputs))]
    plain = [r._replace(params=r.params.replace(logit_bias={}, allowed_token_ids=None)) for r in rows]
    offset = torch.stack([_offset_by_hand(p) for p in CONTROLLED])
    with_controls = SamplingBatch.build(rows, V, "cpu")
    without = SamplingBatch.build(plain, V, "cpu")
    assert with_controls.offset is not None and without.offset is None
    got = process_logits(logits, with_controls)
    want = process_logits(logits + offset, without)
    assert torch.equal(got, want)
    for k in range(4):  # several steps (each its own noise)
        at_step = SamplingBatch.build([r._replace(step=r.step + k) for r in rows], V, "cpu")
        out = sample(logits, at_step)
        plain_at_step = SamplingBatch.build([r._replace(step=r.step + k) for r in plain], V, "cpu")
        assert torch.equal(out.token_ids, sample(logits + offset, plain_at_step).token_ids)
        for i, p in enumerate(CONTROLLED):
            assert p.allowed_token_ids is None or int(out.token_ids[i]) in p.allowed_token_ids
    asking = [r._replace(params=r.params.replace(logprobs=0)) for r in rows]
    logprobs = sample(logits, SamplingBatch.build(asking, V, "cpu"))
    assert logprobs.logprobs is not None
    raw = torch.log_softmax(logits, dim=-1).gather(1, logprobs.token_ids[:, None]).squeeze(1)
    assert torch.allclose(logprobs.logprobs, raw)


def test_a_subset_of_rows_rebuilds_the_offset():
    rows = [_row(CONTROLLED[0], 1), _row(CONTROLLED[1], 2)]
    batch = SamplingBatch.build(rows, V, "cpu")
    assert batch.next_step([1]) is None  # the offset's rows are batch rows: build
    assert batch.next_step() is not None


def test_bad_words_ban_the_token_that_would_complete_a_word():
    seqs = [(5,), (7, 8), (1, 2, 3)]
    assert banned_by_bad_words(seqs, []) == [5]
    assert banned_by_bad_words(seqs, [4, 7]) == [5, 8]
    assert banned_by_bad_words(seqs, [1, 2]) == [5, 3]
    assert banned_by_bad_words(seqs, [2, 1, 2, 7]) == [5, 8]
    assert banned_by_bad_words(seqs, [1, 2, 9]) == [5]


# -- on the real model -----------------------------------------------------------------


def _contains(seq: list[int], sub: tuple[int, ...]) -> bool:
    return any(tuple(seq[i:i + len(sub)]) == sub for i in range(len(seq) - len(sub) + 1))


def test_logit_bias_plus_100_picks_a_token_and_minus_100_forbids_it(smollm_engine):
    prompt = "The capital of France is"
    greedy = SamplingParams(max_tokens=6, temperature=0)
    (plain,) = smollm_engine.generate([prompt], greedy, progress=False)
    forced_id = 1234
    (forced,) = smollm_engine.generate([prompt], greedy.replace(logit_bias={forced_id: 100}), progress=False)
    assert forced.token_ids == [forced_id] * 6
    banned = set(plain.token_ids)
    (forbidden,) = smollm_engine.generate([prompt], greedy.replace(logit_bias=dict.fromkeys(banned, -100.0)),
                                          progress=False)
    assert not banned & set(forbidden.token_ids)
    # Sampled too: n=3 seeded completions never draw a -100 token.
    sampled = SamplingParams(max_tokens=12, temperature=1, seed=5, n=3, logit_bias=dict.fromkeys(banned, -100.0))
    (out,) = smollm_engine.generate([prompt], sampled, progress=False)
    assert all(not banned & set(c.token_ids) for c in out.outputs)


def test_allowed_token_ids_restrict_every_token(smollm_engine):
    tok = smollm_engine.tokenizer
    allowed = sorted({*tok.encode(" yes no maybe Paris London", add_special_tokens=False), tok.eos_token_id})
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=10, temperature=temperature, seed=3, n=3, allowed_token_ids=allowed,
                                presence_penalty=0.5)
        (out,) = smollm_engine.generate(["The capital of France is"], params, progress=False)
        for c in out.outputs:
            assert c.token_ids and set(c.token_ids) <= set(allowed), c


@pytest.mark.parametrize("overlap", [False, True])
def test_bad_words_never_appear_in_the_output_tokens(make_engine, smollm_path, overlap):
    from radixserve.engine.structured import bad_word_ids

    engine = make_engine(smollm_path, overlap_schedule=overlap)
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of France is"
    greedy = SamplingParams(max_tokens=24, temperature=0)
    (plain,) = engine.generate([prompt], greedy, progress=False)
    words = ["Paris", "The capital"]
    seqs = bad_word_ids(engine.tokenizer, words)
    assert any(len(s) > 1 for s in seqs)  # a multi-token word: its last token is banned only after the others
    assert any(_contains(plain.token_ids, s) for s in seqs), plain.text  # each run would say one
    for params in (greedy, SamplingParams(max_tokens=24, temperature=1, seed=11, n=3, top_k=20)):
        (out,) = engine.generate([prompt], params.replace(bad_words=words), progress=False)
        for c in out.outputs:
            assert not any(_contains(c.token_ids, s) for s in seqs), (c.text, seqs)


def test_a_word_of_several_tokens_alone_is_banned_on_later_steps(smollm_engine):
    """Only multi-token words: the first steps suppress nothing, and the ban still comes once
    the word's other tokens are out (each step's sampling tensors are rebuilt, not carried over)."""
    from radixserve.engine.structured import bad_word_ids

    prompt = "Count: 1, 2, 3,"
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (plain,) = smollm_engine.generate([prompt], greedy, progress=False)
    word = plain.text.split()[1]  # "5,": a digit and a comma, two tokens
    seqs = bad_word_ids(smollm_engine.tokenizer, [word])
    assert all(len(s) > 1 for s in seqs) and any(_contains(plain.token_ids, s) for s in seqs), (word, seqs)
    for params in (greedy, SamplingParams(max_tokens=8, temperature=1, seed=5, n=2, top_k=3, ignore_eos=True)):
        (out,) = smollm_engine.generate([prompt], params.replace(bad_words=[word]), progress=False)
        for c in out.outputs:
            assert not any(_contains(c.token_ids, s) for s in seqs), (c.text, seqs)


def test_controlled_requests_leave_their_neighbours_unchanged(smollm_engine):
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    alone = [o.token_ids for o in smollm_engine.generate(prompts, greedy, progress=False)]
    controlled = [SamplingParams(max_tokens=10, temperature=1, seed=1, logit_bias={11: 5.0}),
                  SamplingParams(max_tokens=10, allowed_token_ids=[11, 12, 13]),
                  SamplingParams(max_tokens=10, bad_words=["return"])]
    mixed = smollm_engine.generate(prompts + prompts, [greedy] * 3 + controlled, progress=False)
    assert [o.token_ids for o in mixed[:3]] == alone
    assert set(mixed[4].token_ids) <= {11, 12, 13}


def test_ids_past_the_vocabulary_are_value_errors_naming_the_field(smollm_engine):
    vocab = smollm_engine.core.runner.vocab_size
    for kwargs, field in [({"logit_bias": {vocab: 1}}, "logit_bias"), ({"allowed_token_ids": [1, vocab]},
                                                                       "allowed_token_ids")]:
        with pytest.raises(ValueError, match=rf"^{field} token ids must be in \[0, {vocab}\)"):
            smollm_engine.generate(["Hi"], SamplingParams(max_tokens=2, **kwargs), progress=False)
    tok = smollm_engine.tokenizer
    only = tok.encode("hello", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"^bad_words forbid every token of allowed_token_ids"):
        smollm_engine.generate(["Hi"], SamplingParams(max_tokens=2, allowed_token_ids=only, bad_words=["hello"]),
                               progress=False)
