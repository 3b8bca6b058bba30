"""Structured output and the logit controls over HTTP, as OpenAI, vLLM and SGLang clients send them."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)

M = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 15},
                   "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Name a city and its population as JSON."}]


def check_city(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


def chat(server, **fields):
    return http(server.url + "/v1/chat/completions", "POST", {"model": M, "messages": MESSAGES, "max_tokens": 60,
                                                             **fields})


def test_response_format_json_schema_validates_at_temperature_1(server):
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True,
                                                 "description": "a city"}}
    for seed in (1, 2, 3):
        status, _, body = chat(server, response_format=rf, temperature=1, seed=seed, n=3)
        assert status == 200, body
        assert len(body["choices"]) == 3
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop"
            check_city(choice["message"]["content"])


def test_streamed_json_schema_concatenates_to_valid_json(server):
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    status, _, text = chat(server, response_format=rf, temperature=1, seed=4, stream=True)
    assert status == 200
    events = [e for e in sse_events(text) if e != "[DONE]"]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert len([p for p in pieces if p]) > 3
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    check_city("".join(pieces))


@pytest.mark.parametrize("fields, check", [
    ({"response_format": {"type": "json_object"}}, lambda t: jsonschema.validate(json.loads(t), {"type": "object"})
     is None),
    ({"structured_outputs": {"json": SCHEMA}}, check_city),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, check_city),
    ({"structured_outputs": {"regex": r"[A-Z][a-z]{2,9}, [0-9]{3,7}"}},
     lambda t: re.fullmatch(r"[A-Z][a-z]{2,9}, [0-9]{3,7}", t)),
    ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"structured_outputs": {"choice": ["Paris", "Tokyo"]}}, lambda t: t in ("Paris", "Tokyo")),
    ({"guided_choice": ["Paris", "Tokyo"], "guided_decoding_backend": "auto"}, lambda t: t in ("Paris", "Tokyo")),
    ({"structured_outputs": {"grammar": 'root ::= "City: " [A-Z] [a-z]+'}},
     lambda t: re.fullmatch("City: [A-Z][a-z]+", t)),
    ({"guided_grammar": 'root ::= ("yes" | "no")'}, lambda t: t in ("yes", "no")),
    ({"response_format": {"type": "text"}}, lambda t: isinstance(t, str)),
])
def test_every_spelling_constrains_chat_and_completions(server, fields, check):
    for temperature in (0, 1):
        status, _, body = chat(server, temperature=temperature, seed=9, **fields)
        assert status == 200, body
        assert check(body["choices"][0]["message"]["content"]), body
        status, _, body = http(server.url + "/v1/completions", "POST", {
            "model": M, "prompt": "A city and its population:", "max_tokens": 60, "temperature": temperature,
            "seed": 9, **fields})
        assert status == 200, body
        assert check(body["choices"][0]["text"]), body


def test_sglang_generate_fields(server):
    cases = [
        ({"json_schema": json.dumps(SCHEMA)}, check_city),
        ({"regex": "(yes|no)"}, lambda t: t in ("yes", "no")),
        ({"ebnf": 'root ::= "A" | "B"'}, lambda t: t in ("A", "B")),
        ({"structured": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ]
    for sp, check in cases:
        status, _, body = http(server.url + "/generate", "POST", {
            "text": "Answer:", "sampling_params": {"max_new_tokens": 60, "temperature": 1, "seed": 2, **sp}})
        assert status == 200, body
        assert body["outputs"][0]["finish_reason"] == "stop" and check(body["text"]), body


@pytest.mark.parametrize("route, fields, param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "x": 1}}},
     "response_format.json_schema.x"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": "json"}, "response_format"),
    ("chat", {"guided_regex": "([a-"}, "guided_regex"),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ("completions", {"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ("completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("chat", {"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "guided_json"),
    ("chat", {"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex"),
    ("chat", {"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ("chat", {"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ("chat", {"guided_regex": "a", "allowed_token_ids": [1]}, "allowed_token_ids"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("completions", {"logit_bias": [1]}, "logit_bias"),
    ("chat", {"allowed_token_ids": [1, 49152]}, "allowed_token_ids"),
    ("chat", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("chat", {"allowed_token_ids": "1"}, "allowed_token_ids"),
    ("completions", {"bad_words": "word"}, "bad_words"),
    ("completions", {"bad_words": [""]}, "bad_words"),
    ("generate", {"regex": "(a"}, "sampling_params.regex"),
    ("generate", {"json_schema": 5}, "sampling_params.json_schema"),
    ("generate", {"ebnf": "root ::= ", "regex": "a"}, "sampling_params.ebnf"),
    ("generate", {"logit_bias": {"x": 1}}, "sampling_params.logit_bias"),
    ("generate", {"allowed_token_ids": [49152]}, "sampling_params.allowed_token_ids"),
])
def test_bad_fields_are_400s_naming_them(server, route, fields, param):
    if route == "chat":
        status, _, body = chat(server, **fields)
    elif route == "completions":
        status, _, body = http(server.url + "/v1/completions", "POST",
                               {"model": M, "prompt": "Hi", "max_tokens": 4, **fields})
    else:
        status, _, body = http(server.url + "/generate", "POST",
                               {"text": "Hi", "sampling_params": {"max_new_tokens": 4, **fields}})
    assert status == 400, body
    assert body["error"]["param"] == param, body


def test_logit_bias_allowed_token_ids_and_bad_words_over_http(server, engine):
    tok = engine.tokenizer
    status, _, body = http(server.url + "/v1/completions", "POST", {
        "model": M, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
        "logit_bias": {"1234": 100}})
    assert status == 200 and body["choices"][0]["text"] == tok.decode([1234] * 4), body
    allowed = tok.encode(" yes no", add_special_tokens=False)
    status, _, body = http(server.url + "/generate", "POST", {"text": "Is it?", "sampling_params": {
        "max_new_tokens": 6, "temperature": 1, "seed": 1, "allowed_token_ids": allowed}})
    assert status == 200 and set(body["outputs"][0]["token_ids"]) <= set(allowed), body
    status, _, body = chat(server, messages=[{"role": "user", "content": "What is the capital of France?"}],
                           temperature=0, max_tokens=20, bad_words=["Paris"])
    assert status == 200, body
    ids = tok.encode(body["choices"][0]["message"]["content"], add_special_tokens=False)
    for word in (tok.encode("Paris", add_special_tokens=False), tok.encode(" Paris", add_special_tokens=False)):
        assert not any(ids[i:i + len(word)] == word for i in range(len(ids))), body
