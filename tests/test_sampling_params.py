"""SamplingParams: every field validated with a message naming it, stop fields normalized."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from radixserve.sampling_params import SamplingParams

NAN, INF = math.nan, math.inf

BAD_VALUES = {
    "max_tokens": [-1, 1.0, True, "8", None],
    "temperature": [-0.1, NAN, INF, "1", True, None],
    "top_p": [0.0, -0.5, 1.01, NAN, True],
    "top_k": [-2, -100, 1.5, True, "5", None],
    "min_p": [-0.01, 1.01, NAN, INF, False],
    "repetition_penalty": [0.0, -1.0, NAN, INF, True],
    "presence_penalty": [-2.01, 2.01, NAN, -INF, True],
    "frequency_penalty": [-2.5, 2.5, NAN, INF, False],
    "seed": [1.0, "1", True],
    "stop": [5, [""], "", ["ok", 3], [None], {"a": 1}],
    "stop_token_ids": [[-1], [1.0], [True], "12", 5, [None]],
    "min_tokens": [-1, 129, 1.0, True],
    "ignore_eos": [1, 0, "yes", None],
    "n": [0, -1, 2.0, True, 1025, 10**6, 2**70],
    "logprobs": [-2, 1.0, True, "5"],  # the engine caps a count (its max_logprobs)
    "prompt_logprobs": [-2, -100, 1.0, True, "5"],
    "include_stop_str_in_output": [1, None],
    "skip_special_tokens": [0, "true"],
    "structured": [{"json": {}}, "x", 5],
    "logit_bias": [{1: 101}, {1: -100.5}, {-1: 1}, {"a": 1}, {1: NAN}, {1: True}, {1.0: 1}, [1], "x"],
    "allowed_token_ids": [[], [-1], [1.5], [True], "12", 5],
    "bad_words": [[""], ["  "], [5], 5, {"a": 1}],
}


def test_every_field_is_covered():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_VALUES.items() for v in vs])
def test_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got"):
        SamplingParams(**{field: value})


def test_bad_words_that_no_tokenizer_encodes_are_refused():
    """bad_words are tokenized: a lone UTF-16 surrogate is a ValueError naming the word, not the
    tokenizer's TypeError from inside a request."""
    with pytest.raises(ValueError, match=r"^bad_words\[1\] is not valid Unicode text"):
        SamplingParams(bad_words=["fine", "a\ud800"])


def test_defaults_are_valid_and_documented_values():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == () and p.stop_token_ids == () and p.logprobs is None
    assert (p.min_tokens, p.ignore_eos, p.n, p.include_stop_str_in_output, p.skip_special_tokens) == (
        0, False, 1, False, True,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0), dict(top_p=1), dict(top_p=1e-9), dict(top_k=0), dict(top_k=1), dict(min_p=1),
        dict(repetition_penalty=1e-3), dict(presence_penalty=-2), dict(frequency_penalty=2),
        dict(seed=-5), dict(seed=2**80), dict(min_tokens=128), dict(max_tokens=1, min_tokens=1),
        dict(logprobs=0), dict(logprobs=20), dict(logprobs=-1), dict(logprobs=1000), dict(n=4), dict(ignore_eos=True),
        dict(prompt_logprobs=0), dict(prompt_logprobs=-1), dict(max_tokens=0), dict(max_tokens=0, min_tokens=0),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value


def test_min_tokens_is_bounded_by_max_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens .*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_stop_and_stop_token_ids_are_normalized_to_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[2, 0]).stop_token_ids == (2, 0)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()
    stop = ["x"]
    p = SamplingParams(stop=stop)
    stop.append("y")  # the caller's list is not shared
    assert p.stop == ("x",)


def test_numpy_numbers_become_python_numbers():
    p = SamplingParams(max_tokens=np.int64(7), temperature=np.float32(0.5), seed=np.int32(3))
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.seed) is int
    assert p == SamplingParams(max_tokens=7, temperature=0.5, seed=3)


def test_frozen_hashable_and_replace_revalidates():
    p = SamplingParams(stop=["a"], temperature=0.0)
    assert p.greedy and not SamplingParams().greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("a",), temperature=0))
    q = p.replace(temperature=0.7, seed=1)
    assert (q.temperature, q.seed, q.stop, p.temperature) == (0.7, 1, ("a",), 0.0)
    with pytest.raises(ValueError, match="^top_p"):
        p.replace(top_p=2.0)
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)  # type: ignore[call-arg]


def test_logit_controls_are_normalized():
    p = SamplingParams(logit_bias={np.int64(5): 3, 7: -100}, allowed_token_ids=[9, 3, 3], bad_words="word")
    assert dict(p.logit_bias) == {5: 3.0, 7: -100.0}
    assert all(type(k) is int for k in p.logit_bias)
    assert p.allowed_token_ids == (3, 9)
    assert p.bad_words == ("word",)
    with pytest.raises(TypeError):
        p.logit_bias[5] = 1.0  # type: ignore[index]  # read-only: params never share mutable state
    assert hash(p) == hash(p.replace()) and p == p.replace()


def test_structured_output_takes_exactly_one_constraint():
    from radixserve.sampling_params import StructuredOutput

    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    s = StructuredOutput(json=schema)
    assert (s.kind, s.text) == ("json", '{"type": "object", "properties": {"b": {"type": "string"}, '
                                        '"a": {"type": "integer"}}}')
    assert StructuredOutput(json='{"type": "object"}') == StructuredOutput(json={"type": "object"})
    assert StructuredOutput(choice=["x", "y"]).choice == ("x", "y")
    assert StructuredOutput(json_object=True).kind == "json_object"
    assert SamplingParams(structured=s).structured == s
    for kwargs, message in [
        ({}, r"^structured must set exactly one"),
        ({"json": schema, "regex": "a+"}, r"^structured must set exactly one .* got json, regex"),
        ({"json": "{oops"}, r"^structured\.json is not valid JSON"),
        ({"json": [1, 2]}, r"^structured\.json must be a JSON schema"),
        ({"json": {"a": {1, 2}}}, r"^structured\.json must be JSON-serializable"),
        ({"regex": ""}, r"^structured\.regex must be a non-empty string"),
        ({"grammar": 5}, r"^structured\.grammar must be a non-empty string"),
        ({"choice": "ab"}, r"^structured\.choice must be"),
        ({"choice": []}, r"^structured\.choice must be"),
        ({"json_object": "yes"}, r"^structured\.json_object must be a bool"),
    ]:
        with pytest.raises(ValueError, match=message):
            StructuredOutput(**kwargs)
    for kwargs in ({"min_tokens": 2}, {"allowed_token_ids": [1, 2]}, {"bad_words": ["x"]}):
        with pytest.raises(ValueError, match=rf"^{next(iter(kwargs))} cannot be combined with structured"):
            SamplingParams(structured=s, **kwargs)
