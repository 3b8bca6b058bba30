"""Whole requests drawn from every field the server accepts, valid and invalid values mixed.

Each draw goes to a real server on loopback (every JSON route) or to `Engine` directly,
and afterwards: the answer is a 2xx, or a 4xx with an OpenAI-style JSON error body (never
a 5xx, never an error event in a 200 stream); a normal request still succeeds; /health
is 200; the engine is idle with no KV slot leaked. Id-valued fields draw from the edges
of the vocabulary (V - 1, V, V + 1, 2**63, 2**70), where the engine once died.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers.leaks import assert_no_leak
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)
from helpers.tool_templates import TOOLS_CHAT_TEMPLATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve import SamplingParams
from radixserve.sampling_params import StructuredOutput

M = "smollm2-135m-instruct"
V = 49152  # the built-in model's vocabulary

IDS = st.sampled_from([0, 1, 2, 100, V - 1, V, V + 1, 2**31, 2**63, 2**70, -1])
ID_LISTS = st.one_of(st.lists(IDS, max_size=3), st.just([]), st.sampled_from([None, 5, "1", [[1]], [1.5], [True]]))
TEXT = st.one_of(
    st.sampled_from(["Hello", "The capital of France is", "", " ", "\ud800", "a\udfffb", "\x00", "é" * 3]),
    st.text(max_size=4),
)
TEXTS = st.one_of(
    TEXT, st.lists(TEXT, max_size=2), ID_LISTS, st.lists(st.lists(IDS, min_size=1, max_size=2), max_size=2)
)
NUMBER = st.sampled_from([0, 0.5, 1, 2, -1, -0.5, 1e308, math.inf, math.nan, "1", None, True, [1]])
INT = st.sampled_from([0, 1, 2, 3, -1, 2**63, 2**70, 1.5, "2", None, True])
BOOL = st.sampled_from([True, False, None, 0, 1, "true"])
STOP = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.none(), st.just(5))
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL = st.one_of(st.just(WEATHER), st.sampled_from([
    {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": 5}},
    {"type": "function", "function": {"name": "\ud800"}}, {"type": "retrieval"}, 5, {},
    {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
    {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": 5}}}},
    {"type": "function", "function": {"name": "f", "strict": True}},
    {"type": "function", "function": {"name": "f", "description": None, "parameters": None}},
]))
TOOLS = st.one_of(st.none(), st.just([]), st.lists(TOOL, max_size=3), st.sampled_from(["x", {"a": 1}]))
TOOL_CHOICE = st.sampled_from([
    None, "none", "auto", "required", "always", 5, {"type": "function"},
    {"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "nope"}},
])
TOOL_CALLS = st.sampled_from([
    None, [], 5, [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}],
    [{"id": "c1", "function": {"name": "f", "arguments": {"a": [1]}}}], [{"id": 1}],
    [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
    [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}],
])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", 5]), "content": st.one_of(
        TEXT, st.just([{"type": "text", "text": "hi"}]), st.just([{"type": "image_url"}]), st.none())},
    optional={"name": st.sampled_from(["ada", "", 5, "\ud800"]), "tool_calls": TOOL_CALLS,
              "tool_call_id": st.sampled_from(["c1", 5, None]), "reasoning_content": st.sampled_from(["r", 5, None]),
              "refusal": st.sampled_from([None, "no"])},
)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=3), st.just([{"role": "user", "content": "Hi"}]), st.sampled_from(
    [None, "hi", [{}], [{"role": "user"}]]))

SAMPLING = {
    "max_tokens": st.sampled_from([1, 2, 0, -1, "1", 1.5, None, 10**9]),
    "temperature": NUMBER, "top_p": NUMBER, "top_k": INT, "min_p": NUMBER,
    "repetition_penalty": NUMBER, "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
    "seed": INT, "n": st.sampled_from([1, 2, 0, -1, 10**6, 2**70, "2", None]),
    "stop": STOP, "stop_token_ids": ID_LISTS, "min_tokens": INT, "ignore_eos": BOOL,
    "logprobs": st.sampled_from([None, True, False, 0, 1, 5, 20, 21, -1]),
    "prompt_logprobs": st.sampled_from([None, True, 0, 1, 5, 20, 21, -1, -2, "1", 1.5]),
    "include_stop_str_in_output": BOOL, "skip_special_tokens": BOOL,
    "logit_bias": st.sampled_from([{}, {"1": 5}, {"1": 100}, {"1": 101}, {"x": 1}, {str(V): 1}, {"-1": 2}, {1: 3},
                                   {"2": math.nan}, {"3": "1"}, [1], None]),
    "allowed_token_ids": ID_LISTS,
    "bad_words": st.one_of(st.lists(TEXT, max_size=2), st.sampled_from([None, "x", 5, [5]])),
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
STRUCTURED_DICTS = st.sampled_from([{"regex": "[ab]+"}, {"choice": ["x", "y"]}, {"json": SCHEMA}, {"json": "{"},
                                    {"grammar": 'root ::= "a"'}, {"regex": "(("}, {}, 5, {"json_object": True},
                                    {"regex": "a", "choice": ["b"]}, {"bogus": 1}, {"json": {"type": "nope"}}])
REGEX = st.sampled_from(["[ab]+", "((", "", 5, None, "\\d{2}"])
OPENAI_EXTRA = {
    "stream": BOOL, "stream_options": st.sampled_from([
        None, {}, {"include_usage": True}, {"bogus": 1}, 5, {"continuous_usage_stats": True},
        {"continuous_usage_stats": True, "include_usage": False}, {"continuous_usage_stats": "yes"}]),
    "user": st.sampled_from(["u", 5, None, "\ud800"]),
    "echo": BOOL, "best_of": INT, "suffix": st.sampled_from(["", "x", None]),
    "top_logprobs": INT, "response_format": st.sampled_from([
        {"type": "text"}, {"type": "json_object"}, None, {"type": "xml"}, 5, {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}}]),
    "structured_outputs": STRUCTURED_DICTS, "guided_json": st.sampled_from([SCHEMA, "{", 5, {"type": "nope"}, None]),
    "guided_regex": REGEX, "guided_choice": st.sampled_from([["x", "y"], [], "x", [5], None]),
    "guided_grammar": st.sampled_from(['root ::= "a"', "root ::= ", 5, None]),
    "guided_decoding_backend": st.sampled_from(["xgrammar", "auto", "outlines", 5, None]),
    "bogus_field": st.just(1),
    "add_generation_prompt": BOOL, "continue_final_message": BOOL,
    "chat_template_kwargs": st.sampled_from([{}, {"enable_thinking": False}, {"tokenize": True}, {"x": "\ud800"}, 5,
                                             None]),
    "tools": TOOLS, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": BOOL,
    "truncate_prompt_tokens": st.sampled_from([None, -1, 0, 1, 3, -2, 2**63, "2", True]),
    "return_token_ids": BOOL, "return_tokens_as_token_ids": BOOL, "use_beam_search": BOOL,
    "length_penalty": st.sampled_from([1, 1.0, 0.5, None, "1"]), "spaces_between_special_tokens": BOOL,
    "request_id": st.sampled_from([None, "r1", "", 5, "x" * 300, "\ud800"]), "priority": INT,
}
# SGLang's names in /generate's sampling_params.
SGLANG = {
    "max_new_tokens": st.sampled_from([1, 2, 0, -1, "1", None]), "min_new_tokens": INT, "no_stop_trim": BOOL,
    "sampling_seed": INT, "spaces_between_special_tokens": BOOL,
}
ITEM = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", 5]), "content": st.one_of(
        TEXT, st.just([{"type": "input_text", "text": "hi"}]), st.just([{"type": "output_text", "text": "a"}]),
        st.just([{"type": "input_image", "image_url": "x"}]), st.none())},
    optional={"type": st.sampled_from(["message", "function_call", 5])},
)
RESPONSES = {
    "model": st.sampled_from([M, M, "other"]),
    "input": st.one_of(TEXT, st.lists(ITEM, max_size=3), st.sampled_from([None, 5, [], [{}]])),
    "instructions": st.sampled_from([None, "Be terse.", "", 5, "\ud800"]),
    "max_output_tokens": st.sampled_from([1, 2, 0, -1, None, "2", 10**9]),
    "temperature": NUMBER, "top_p": NUMBER, "stream": BOOL, "user": st.sampled_from(["u", 5, None]),
    "metadata": st.sampled_from([None, {}, {"k": "v"}, {"k": 5}, [], {str(i): "v" for i in range(17)}]),
    "store": BOOL, "previous_response_id": st.sampled_from([None, "resp_missing", 5]),
    "tools": st.sampled_from([[], [{"type": "function", "name": "f"}], None]),
    "tool_choice": st.sampled_from(["auto", "none", "required", None]), "background": BOOL,
    "text": st.sampled_from([None, {"format": {"type": "text"}}, {"format": {"type": "json_object"}}]),
    "truncation": st.sampled_from([None, "disabled", "auto"]), "include": st.sampled_from([None, [], ["x"]]),
    "reasoning": st.sampled_from([None, {"effort": "low"}]), "top_logprobs": st.sampled_from([None, 0, 2]),
    "bogus_field": st.just(1),
}


@pytest.fixture(scope="module", autouse=True)
def tool_template(engine):
    """A chat template that shows tools and teaches <tool_call> blocks, so tool draws get past it."""
    saved = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    yield
    engine.tokenizer.chat_template = saved


def _bounded(body: dict) -> dict:
    """Keep generation short on the CPU: valid lengths and counts above 2 become 2, and a missing
    max_tokens (chat's default is the rest of the context) is 2."""
    if body.get("max_tokens") is None:
        body["max_tokens"] = 2
    for key in ("max_tokens", "n", "min_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and 2 < body[key] <= 1024:
            body[key] = 2
    return body


def _bounded_output(body: dict) -> dict:
    """/v1/responses: a missing max_output_tokens is 2, valid ones above 2 become 2."""
    value = body.get("max_output_tokens")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 2 < value <= 1024):
        body["max_output_tokens"] = 2
    return body


def _fields(pool: dict, *required: str) -> st.SearchStrategy[dict]:
    optional = {k: v for k, v in pool.items() if k not in required}
    return st.fixed_dictionaries({k: pool[k] for k in required}, optional=optional)


def _request(route: str) -> st.SearchStrategy[tuple[str, dict]]:
    if route == "/generate":
        pool = {**SAMPLING, **SGLANG, "regex": REGEX, "ebnf": st.sampled_from(['root ::= "a" | "b"', "root ::= ", 5]),
                "json_schema": st.sampled_from([json.dumps(SCHEMA), "{", 5, SCHEMA]), "structured": STRUCTURED_DICTS}
        body = st.fixed_dictionaries({"sampling_params": _fields(pool).map(_bounded)}, optional={
            "text": TEXT, "input_ids": ID_LISTS, "stream": BOOL, "return_logprob": BOOL,
            "logprob_start_len": INT, "top_logprobs_num": INT, "return_text_in_logprobs": BOOL})
    elif route == "/v1/responses":
        body = _fields(RESPONSES, "model", "input").map(_bounded_output)
    elif route == "/tokenize":
        body = st.fixed_dictionaries({}, optional={
            "model": st.sampled_from([M, "other", 5]), "prompt": TEXTS, "messages": MESSAGES,
            "add_special_tokens": BOOL, "add_generation_prompt": BOOL, "return_token_strs": BOOL, "tools": TOOLS})
    elif route == "/detokenize":
        body = st.fixed_dictionaries({"tokens": ID_LISTS}, optional={"model": st.sampled_from([M, "other"])})
    elif route == "/v1/embeddings":
        body = st.fixed_dictionaries({"model": st.sampled_from([M, "other"]), "input": TEXTS}, optional={
            "pooling": st.sampled_from(["last", "mean", "cls", "max", 1]), "normalize": BOOL,
            "encoding_format": st.sampled_from(["float", "base64", "bits"]), "dimensions": INT,
            "user": st.just("u")})
    else:
        first = "messages" if "chat" in route else "prompt"
        pool = {**SAMPLING, **OPENAI_EXTRA, "model": st.sampled_from([M, M, "gpt-17"]),
                "messages": MESSAGES, "prompt": TEXTS}
        body = _fields(pool, "model", first).map(_bounded)
    return body.map(lambda b: (route, b))


ROUTES = ["/v1/completions", "/v1/chat/completions", "/generate", "/v1/embeddings", "/tokenize", "/detokenize",
          "/v1/responses"]


def _check_answer(status: int, headers: dict, answer, streamed: bool) -> None:
    if 400 <= status < 500:
        assert headers["Content-Type"].startswith("application/json"), (status, answer)
        assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
        return
    assert 200 <= status < 300, (status, answer)
    if streamed and isinstance(answer, str):
        events = sse_events(answer)
        assert not [e for e in events if isinstance(e, dict) and "error" in e], events
        if events and isinstance(events[0], dict) and str(events[0].get("type")).startswith("response."):
            assert events[-1]["type"] == "response.completed", answer  # the Responses API ends so
        else:
            assert events and events[-1] == "[DONE]", answer


def _healthy(server, engine) -> None:
    status, _, body = http(server.url + "/v1/completions", "POST",
                           {"model": M, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 1, body
    assert http(server.url + "/health")[0] == 200
    assert engine.is_alive()
    assert_no_leak(engine)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.sampled_from(ROUTES).flatmap(_request))
def test_no_request_makes_a_5xx_or_stops_the_server(server, engine, drawn):
    route, body = drawn
    raw = json.dumps(body).encode()  # NaN and Infinity go as the JS literals some clients send
    status, headers, answer = http(server.url + route, "POST", raw=raw)
    _check_answer(status, headers, answer, streamed=body.get("stream") is True)
    _healthy(server, engine)


ENGINE_FIELDS = {
    **SAMPLING,
    "logit_bias": st.sampled_from([{}, {1: 5}, {1: 101}, {V: 1}, {-1: 2}, {"1": 3}, {2: math.nan}, None, [1]]),
    "structured": st.sampled_from([None, StructuredOutput(regex="[ab]+"), StructuredOutput(choice=["x", "y"]),
                                   StructuredOutput(json=SCHEMA), StructuredOutput(regex="(("),
                                   StructuredOutput(grammar="root ::= "), {"json": {}}, "x"]),
}


def _bounded_engine(kw: dict) -> dict:
    """As _bounded; and max_tokens 10**9 (valid for Engine: it ends at the context) becomes 2, since
    a request that ignores EOS, is constrained or samples freely could run for minutes on the CPU to
    reach the context. The HTTP draws keep 10**9, which the server refuses past the context."""
    if kw.get("max_tokens") == 10**9:
        kw["max_tokens"] = 2
    return kw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXTS, kw=_fields(ENGINE_FIELDS).map(_bounded).map(_bounded_engine))
def test_engine_refuses_or_serves_every_drawn_request(engine, prompt, kw):
    """Through Engine: a ValueError at submission, or a result that ended normally."""
    try:
        params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
        outs = engine.generate(prompt, params, progress=False)
    except ValueError:
        pass
    else:
        assert all(c.finish_reason in ("stop", "length") for o in outs for c in o.outputs), outs
    assert engine.is_alive()
    assert_no_leak(engine)
    ok = engine.generate("Hello", SamplingParams(max_tokens=1, temperature=0), progress=False)[0]
    assert ok.finish_reason == "length" and len(ok.token_ids) == 1


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [V]}),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [999999]}),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [2**70]}),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "min_tokens": 1, "stop_token_ids": [V]}),
    ("/generate", {"text": "hi", "sampling_params": {"max_tokens": 4, "min_tokens": 1, "stop_token_ids": [V]}}),
])
def test_out_of_vocabulary_stop_ids_are_a_400(server, engine, route, body):
    """The request that once stopped the engine until restart."""
    status, _, err = http(server.url + route, "POST", body)
    assert status == 400, err
    assert err["error"]["param"] in ("stop_token_ids", "sampling_params.stop_token_ids"), err
    _healthy(server, engine)
