"""The request side of tool calling (server/tools.py): parsing, the format a chat template teaches,
and the JSON schema that forces `tool_choice` "required" or a named function, checked with xgrammar."""

from __future__ import annotations

import json

import pytest

from radixserve.server.errors import ApiError
from radixserve.server.tool_formats import make_parser
from radixserve.server.tool_parser import parse_whole
from radixserve.server.tools import (
    ToolRequest,
    forced_format,
    forced_tool_schema,
    parse_tool_request,
    resolve_tool_parser,
    template_tool_parser,
    tool_output,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: an empty object


def test_defaults_and_choices():
    assert parse_tool_request({}) == ToolRequest()
    req = parse_tool_request({"tools": [WEATHER]})
    assert req.choice == "auto" and req.parallel and req.tools == [WEATHER]
    assert parse_tool_request({"tools": [], "tool_choice": "auto"}).choice == "none"  # nothing to call
    named = parse_tool_request({"tools": [WEATHER, TIME], "parallel_tool_calls": False,
                                "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert (named.choice, named.name, named.parallel, named.forced) == ("named", "get_time", False, True)
    # strict false is accepted and not passed on to the template
    assert parse_tool_request({"tools": [{"type": "function", "function": {"name": "f", "strict": False}}]}).tools == [
        {"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize("body, param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 257}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]},
     "tools[0].function.parameters.properties"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools[0].extra"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function"),
    ({"tools": [WEATHER], "tool_choice": 1}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(ApiError) as err:
        parse_tool_request(body)
    assert err.value.status == 400 and err.value.param == param


QWEN3_SNIPPET = ('{%- if tools %}...<tools>{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}</tools>'
                 '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>{%- endif %}')
LLAMA31_SNIPPET = ('{%- if tools %}Respond in the format {"name": function name, "parameters": dictionary of '
                   'argument name and its value}.{{- "<|python_tag|>" }}{%- endif %}')


def test_the_parser_follows_the_template():
    assert template_tool_parser(QWEN3_SNIPPET) == "hermes"
    assert template_tool_parser(LLAMA31_SNIPPET) == "llama3_json"
    assert template_tool_parser("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert resolve_tool_parser("auto", QWEN3_SNIPPET) == "hermes"
    assert resolve_tool_parser("llama3_json", QWEN3_SNIPPET) == "llama3_json"
    assert resolve_tool_parser("none", QWEN3_SNIPPET) is None
    auto = parse_tool_request({"tools": [WEATHER], "parallel_tool_calls": False})
    assert tool_output(auto, "auto", QWEN3_SNIPPET) == ("hermes", 1, {})
    assert tool_output(parse_tool_request({"tools": [WEATHER], "tool_choice": "none"}), "none", QWEN3_SNIPPET) == (
        None, None, {})
    with pytest.raises(ApiError) as err:
        tool_output(auto, "none", QWEN3_SNIPPET)
    assert err.value.param == "tool_choice"


def _accepts(schema: dict, text: str) -> bool:
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema)), text)


def test_required_schema_forces_calls_to_the_tools_with_their_arguments():
    req = parse_tool_request({"tools": [WEATHER, TIME], "tool_choice": "required"})
    schema = forced_tool_schema(req)
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    conforming = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "get_time", ' \
                 '"arguments": {}}]'
    assert _accepts(schema, conforming)
    assert not _accepts(schema, '[]')  # at least one call
    assert not _accepts(schema, '[{"name": "get_weather", "arguments": {"days": 2}}]')  # city is required
    assert not _accepts(schema, '[{"name": "get_time", "arguments": {"city": "Paris", "days": 2}}]')  # not its own
    assert not _accepts(schema, '[{"name": "other", "arguments": {}}]')
    # and the reply reads as the calls
    parsed = parse_whole(make_parser(forced_format(req)), conforming)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert parsed.content == ""


def test_required_without_parallel_calls_forces_exactly_one():
    req = parse_tool_request({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    schema = forced_tool_schema(req)
    assert schema is not None and schema["maxItems"] == 1
    one = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert _accepts(schema, one) and not _accepts(schema, one[:-1] + ", " + one[1:])


def test_a_named_function_forces_its_arguments():
    req = parse_tool_request({"tools": [WEATHER, TIME],
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    schema = forced_tool_schema(req)
    assert schema == WEATHER["function"]["parameters"]
    reply = '{"city": "Zürich"}'
    assert _accepts(schema, reply) and not _accepts(schema, '{"days": 1}')
    parsed = parse_whole(make_parser(forced_format(req)), reply)
    assert parsed.calls[0]["function"] == {"name": "get_weather", "arguments": reply} and parsed.content == ""
    empty = forced_tool_schema(parse_tool_request({"tools": [TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}))
    assert empty is not None and _accepts(empty, "{}")


def test_auto_and_none_force_nothing():
    for choice in ("auto", "none"):
        assert forced_tool_schema(parse_tool_request({"tools": [WEATHER], "tool_choice": choice})) is None


def test_server_options_are_checked_before_the_model_loads():
    from radixserve.cli import main
    from radixserve.server import ServerConfig

    assert ServerConfig(tool_call_parser="hermes", reasoning_parser="qwen3").reasoning_parser == "qwen3"
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="mistral")
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServerConfig(reasoning_parser="o1")
    assert main(["serve", "--tool-call-parser", "mistral"]) == 2
    assert main(["serve", "--reasoning-parser", "o1"]) == 2
