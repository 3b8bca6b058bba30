"""Structured output on the real SmolLM2: every output satisfies its constraint, whatever the
engine does around it (overlap, chunked prefill, a warm prefix cache, retraction, a failed
step), and the same seeds give the same outputs with overlap on and off."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from radixserve import SamplingParams
from radixserve.model_runner import model_runner as runner_module
from radixserve.model_runner.model_runner import ModelRunner
from radixserve.sampling_params import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}
PERSON = StructuredOutput(json=SCHEMA)
SEEDS = (1, 2, 3)


def check_person(text: str) -> dict:
    """The output parsed and validated against SCHEMA."""
    obj = json.loads(text)
    jsonschema.validate(obj, SCHEMA)
    return obj


@pytest.fixture(scope="module")
def prompt(smollm_path) -> list[int]:
    from radixserve.engine.model_files import load_tokenizer

    tok = load_tokenizer(smollm_path)
    messages = [{"role": "user", "content": "Describe a person as JSON: name, age and favourite colors."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _people(engine, prompt, temperature: float = 1.0) -> list[list[int]]:
    params = [SamplingParams(max_tokens=80, temperature=temperature, seed=s, n=3, structured=PERSON) for s in SEEDS]
    outs = engine.generate([prompt] * len(SEEDS), params, progress=False)
    tokens = []
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            check_person(c.text)
            tokens.append(c.token_ids)
    return tokens


VARIANTS = [
    pytest.param({"overlap_schedule": False}, id="sequential"),
    pytest.param({"overlap_schedule": True}, id="overlap"),
    pytest.param({"overlap_schedule": True, "max_prefill_tokens": 8}, id="overlap-chunked"),
    pytest.param({"overlap_schedule": False, "max_prefill_tokens": 8, "fold_mode": "mlp"}, id="chunked-mlp"),
]


@pytest.fixture(scope="module")
def reference(smollm_path, prompt) -> list[list[int]]:
    """The sampled outputs of a plain sequential engine: every variant must give the same."""
    from radixserve import Engine

    engine = Engine(str(smollm_path), device="cpu", overlap_schedule=False, max_running_requests=16,
                    check_invariants=True, show_progress=False)
    try:
        return _people(engine, prompt)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("opts", VARIANTS)
def test_json_schema_outputs_validate_and_do_not_depend_on_the_engine(make_engine, smollm_path, prompt, reference,
                                                                      opts):
    """Temperature 1, three seeds, n=3: every completion is JSON that validates. Run twice, the
    second time on a warm prefix cache; the tokens equal the sequential reference's each time."""
    engine = make_engine(smollm_path, max_running_requests=16, **opts)
    assert _people(engine, prompt) == reference
    before = engine.stats()["hit_tokens"]
    assert _people(engine, prompt) == reference
    assert engine.stats()["hit_tokens"] - before >= len(prompt) - 1  # the prompt came from the cache


def test_retraction_keeps_grammar_outputs_valid(make_engine, smollm_path, prompt, reference, monkeypatch):
    """A pool too small for the nine completions, and admission that reserves nothing for their
    outputs: requests are retracted and resume with their matchers as they were; the outputs
    are still the reference's."""
    from radixserve.scheduler import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "NEW_TOKEN_RATIO_INIT", 0.0)
    monkeypatch.setattr(scheduler_module, "NEW_TOKEN_RATIO_MIN", 0.0)
    engine = make_engine(smollm_path, overlap_schedule=True, kv_cache_tokens=len(prompt) + 100,
                         max_prefill_tokens=16, max_running_requests=16)
    assert _people(engine, prompt) == reference
    assert engine.stats()["retractions"] > 0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("where", ["forward", "sample"])
def test_a_failed_step_keeps_grammar_outputs_valid(make_engine, smollm_path, prompt, reference, monkeypatch, overlap,
                                                   where):
    """A step fails once mid-generation (in the forward, or in the sampling that overlap defers);
    its tokens are discarded and the requests recompute: every matcher holds the output its
    request kept, so the outputs are the reference's."""
    calls = {"n": 0}
    if where == "forward":
        real_forward = ModelRunner.forward

        def forward(self, batch):
            calls["n"] += 1
            if calls["n"] == 12:
                raise RuntimeError("injected failure in the forward")
            return real_forward(self, batch)

        monkeypatch.setattr(ModelRunner, "forward", forward)
    else:
        real_sample = runner_module.sample

        def sample(logits, batch, bitmask=None):
            calls["n"] += 1
            if calls["n"] == 12:
                raise RuntimeError("injected failure in the sampler")
            return real_sample(logits, batch, bitmask)

        monkeypatch.setattr(runner_module, "sample", sample)
    engine = make_engine(smollm_path, overlap_schedule=overlap, max_running_requests=16)
    assert _people(engine, prompt) == reference
    assert engine.stats()["failed_steps"] == 1


def test_greedy_outputs_match_with_overlap_on_and_off(make_engine, smollm_path, prompt):
    outs = []
    for overlap in (False, True):
        engine = make_engine(smollm_path, overlap_schedule=overlap)
        outs.append(_people(engine, prompt, temperature=0.0))
    assert outs[0] == outs[1]


def test_regex_choice_grammar_and_json_object(smollm_engine):
    regex = r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"
    choices = ("Paris", "London", "Rome", "a (b) c?")
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    answers = {"The answer is yes.", "The answer is no."}
    cases = [
        ("My email address is", StructuredOutput(regex=regex), lambda t: re.fullmatch(regex, t)),
        ("The capital of France is", StructuredOutput(choice=choices), lambda t: t in choices),
        ("Is water wet?", StructuredOutput(grammar=grammar), lambda t: t in answers),
        (smollm_engine.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer in JSON."}]),
         StructuredOutput(json_object=True), lambda t: jsonschema.validate(json.loads(t), {"type": "object"}) is None),
    ]
    for prompt, structured, ok in cases:
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=60, temperature=temperature, seed=7, n=2, structured=structured)
            (out,) = smollm_engine.generate([prompt], params, progress=False)
            for c in out.outputs:
                assert c.finish_reason == "stop" and ok(c.text), (structured, c)


def test_grammar_outputs_beside_free_requests_leave_those_unchanged(smollm_engine, prompt):
    """A greedy request without a constraint gives the same tokens alone and batched with
    constrained ones."""
    free = SamplingParams(max_tokens=16, temperature=0)
    (alone,) = smollm_engine.generate([prompt], free, progress=False)
    mixed = smollm_engine.generate(
        [prompt, prompt, "Hello"], [SamplingParams(max_tokens=80, temperature=1, seed=4, structured=PERSON), free,
                                    SamplingParams(max_tokens=8, structured=StructuredOutput(regex="[0-9]+"))],
        progress=False)
    assert mixed[1].token_ids == alone.token_ids
    check_person(mixed[0].outputs[0].text)
    assert re.fullmatch("[0-9]+", mixed[2].outputs[0].text)


def test_streaming_concatenates_to_valid_json(smollm_engine, prompt):
    params = SamplingParams(max_tokens=80, temperature=1, seed=5, structured=PERSON)
    deltas = list(smollm_engine.stream(prompt, params))
    assert len([d for d in deltas if d.text]) > 3
    assert deltas[-1].finish_reason == "stop"
    check_person("".join(d.text for d in deltas))


def test_bad_constraints_are_value_errors_naming_the_field(smollm_engine):
    for structured, message in [
        (StructuredOutput(regex="([a-"), r"^structured\.regex does not compile"),
        (StructuredOutput(json={"type": "frobnicate"}), r"^structured\.json does not compile"),
        (StructuredOutput(grammar="root ::= "), r"^structured\.grammar does not compile"),
        (StructuredOutput(grammar='start ::= "a"'), r"^structured\.grammar does not compile"),
    ]:
        with pytest.raises(ValueError, match=message):
            smollm_engine.generate(["Hi"], SamplingParams(max_tokens=4, structured=structured), progress=False)


def test_each_constraint_compiles_once(smollm_engine):
    structured = StructuredOutput(regex="(cat|dog)s?")
    smollm_engine.check_params(SamplingParams(structured=structured))
    compilers = smollm_engine._grammars
    before = compilers.compiled
    params = SamplingParams(max_tokens=8, temperature=1, seed=3, n=3, structured=StructuredOutput(regex="(cat|dog)s?"))
    outs = smollm_engine.generate(["Pets:"] * 2, params, progress=False)
    assert all(re.fullmatch("(cat|dog)s?", c.text) for o in outs for c in o.outputs)
    assert compilers.compiled == before  # the same kind and text: the cached grammar


def test_matcher_sync_rolls_back_to_the_kept_output(smollm_engine):
    """The matcher's invariant restored: accepted tokens past what the request kept are rolled
    back, and the mask then equals that of a matcher that only ever saw the kept tokens."""
    from radixserve.engine.structured import fill_bitmask

    compilers = smollm_engine._grammar_compilers("structured")
    tok = smollm_engine.tokenizer
    text = '{"name": "Ada", "age": 36, "colors": ["red"]}'
    ids = tok.encode(text, add_special_tokens=False)
    kept = ids[: len(ids) // 2]
    ahead, fresh = compilers.matcher(PERSON), compilers.matcher(PERSON)
    for t in ids:
        ahead.accept(t)
    vocab = compilers.vocab_size
    got, _ = fill_bitmask([ahead], [kept], vocab)
    want, _ = fill_bitmask([fresh], [kept], vocab)
    assert ahead.accepted == kept == fresh.accepted
    assert got.equal(want)
    full, _ = fill_bitmask([compilers.matcher(PERSON)], [ids], vocab)
    assert not got.equal(full)  # the masks tell the two states apart
    with pytest.raises(ValueError, match="not allowed by the structured output's grammar"):
        ahead.accept(tok.encode("}", add_special_tokens=False)[0])
