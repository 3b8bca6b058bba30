"""Tool calling and reasoning in the chat API, on a real server over SmolLM2 with a chat template
that shows tools (helpers/tool_templates.py).

The real model makes a call when earlier turns show it how (few-shot, greedy); the rest of what
the parsers make of a reply is checked on replies the test chooses: `Scripted` is the real
engine except that `generate_async` streams a given text, so everything between the engine and
the client (routes, response builder, parsers, SSE, the openai client) is the real code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)
from helpers.tool_templates import TOOLS_CHAT_TEMPLATE

from radixserve.engine.outputs import StreamDelta
from radixserve.server import BackgroundServer, ServerConfig

M = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HISTORY = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
]


@pytest.fixture(scope="module", autouse=True)
def tool_template(engine) -> Iterator[None]:
    saved = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    yield
    engine.tokenizer.chat_template = saved


class Scripted:
    """The engine, except that a generation streams `reply` (a few characters per step)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.reply = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate_async(self, ids: list[int], params: Any) -> AsyncGenerator[StreamDelta, None]:
        pieces = [self.reply[i:i + 3] for i in range(0, len(self.reply), 3)] or [""]
        for k, text in enumerate(pieces):
            last = k == len(pieces) - 1
            yield StreamDelta(request_id="scripted", index=0, text=text, token_ids=(0,), logprobs=None,
                              finish_reason="stop" if last else None, prompt_tokens=len(ids), cached_tokens=0,
                              completion_tokens=k + 1)


@pytest.fixture(scope="module")
def scripted(engine) -> Scripted:
    return Scripted(engine)


@pytest.fixture(scope="module")
def fake(scripted) -> Iterator[BackgroundServer]:
    with BackgroundServer(scripted, ServerConfig(port=0)) as srv:  # type: ignore[arg-type]
        yield srv


@pytest.fixture(scope="module")
def thinking(scripted) -> Iterator[BackgroundServer]:
    with BackgroundServer(scripted, ServerConfig(port=0, reasoning_parser="qwen3")) as srv:  # type: ignore[arg-type]
        yield srv


def _client(srv: BackgroundServer) -> Any:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(srv, messages=ASK, **fields):
    body = {"model": M, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    return http(srv.url + "/v1/chat/completions", "POST", body)


def _count(srv, **body) -> list[int]:
    status, _, answer = http(srv.url + "/tokenize", "POST", {"model": M, **body})
    assert status == 200, answer
    return answer["tokens"]


# -- requests on the real model --------------------------------------------------------------


def test_tools_reach_the_prompt(server, engine):
    plain = _count(server, messages=ASK)
    with_tools = _count(server, messages=ASK, tools=[WEATHER, TIME])
    text = engine.tokenizer.decode(with_tools)
    assert len(with_tools) > len(plain) and '"name": "get_weather"' in text and '"name": "get_time"' in text
    status, _, body = _chat(server, tools=[WEATHER, TIME])
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(with_tools)
    assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    # tool_choice "none" still shows the tools (as vLLM does), and reads no calls
    status, _, body = _chat(server, tools=[WEATHER], tool_choice="none")
    assert status == 200 and body["usage"]["prompt_tokens"] == len(_count(server, messages=ASK, tools=[WEATHER]))
    assert "tool_calls" not in body["choices"][0]["message"]


def test_tool_calls_and_tool_messages_in_the_history(server, engine):
    ids = _count(server, messages=HISTORY, tools=[WEATHER])
    text = engine.tokenizer.decode(ids)
    # the arguments reached the template as a dict (tojson'd once, not a quoted string)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n22 C and sunny\n</tool_response>" in text
    status, _, body = _chat(server, HISTORY, tools=[WEATHER])
    assert status == 200 and body["usage"]["prompt_tokens"] == len(ids), body


def _few_shot(cities: list[str], ask: str) -> list[dict]:
    """Earlier turns in which the assistant answered each question with a call: SmolLM2 follows suit."""
    messages: list[dict] = []
    for city in cities:
        messages += [{"role": "user", "content": f"Weather in {city}?"}, {"role": "assistant", "content": None,
                     "tool_calls": [{"id": f"call_{city}", "type": "function", "function": {
                         "name": "get_weather", "arguments": json.dumps({"city": city})}}]}]
    return [*messages, {"role": "user", "content": ask}]


def test_the_real_model_calls_a_tool_through_the_openai_client(server):
    client = _client(server)
    messages = _few_shot(["Paris", "Oslo", "Rome"], "Weather in Lima?")
    resp = client.chat.completions.create(model=M, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lima"}
    stream = client.chat.completions.create(model=M, messages=messages, tools=[WEATHER], max_tokens=40,
                                            temperature=0, stream=True)
    args, finish = "", None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert args == call.function.arguments and finish == "tool_calls"


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [5]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER, {"type": "function", "function": {"description": "no name"}}]}, "tools[1].function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": ""}}]}, "tools[1].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "city"}}}]},
     "tools[0].function.parameters.required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools[0].function.strict"),
    ({"tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]}, "tools[0].function.bogus"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "content": None}]}, "messages[1].content"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}]},
     "messages[1].tool_calls[0].id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "content": "x", "refusal": "no"}]}, "messages[1].refusal"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[p for _, p in BAD])
def test_bad_tool_fields_are_a_400_naming_the_field(server, fields, param):
    status, _, err = _chat(server, **{"messages": ASK, **fields})
    assert status == 400, err
    assert err["error"]["param"] == param, err


def test_forced_tool_choices_always_give_calls(server):
    """required and a named function hold the real model's reply to the calls' schema: at
    temperature 1, with several seeds, every reply parses into calls of the given tools."""
    for seed in range(3):
        for choice, names in (("required", {"get_weather", "get_time"}),
                              ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):
            status, _, body = _chat(server, tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=seed,
                                    max_tokens=96, parallel_tool_calls=False)
            assert status == 200, body
            choice_body = body["choices"][0]
            if choice_body["finish_reason"] == "length":
                continue  # cut off inside the call: not a whole call to parse
            calls = choice_body["message"]["tool_calls"]
            assert len(calls) == 1 and choice_body["finish_reason"] == "tool_calls", body
            assert calls[0]["function"]["name"] in names
            arguments = json.loads(calls[0]["function"]["arguments"])
            assert isinstance(arguments, dict)
            if calls[0]["function"]["name"] == "get_weather":
                assert isinstance(arguments["city"], str)


def test_forced_tool_choice_and_another_constraint_are_a_400(server):
    status, _, err = _chat(server, tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert status == 400 and err["error"]["param"] == "tool_choice", err
    assert "response_format" in err["error"]["message"]


def test_templates_without_tools_or_a_known_format(server, engine):
    saved = engine.tokenizer.chat_template
    try:
        engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        status, _, err = _chat(server, tools=[WEATHER])
        assert status == 400 and err["error"]["param"] == "tools", err
        status, _, err = http(server.url + "/tokenize", "POST", {"messages": ASK, "tools": [WEATHER]})
        assert status == 400 and err["error"]["param"] == "tools", err
        engine.tokenizer.chat_template = "{{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        status, _, err = _chat(server, tools=[WEATHER])
        assert status == 400 and err["error"]["param"] == "tool_choice", err  # auto: no parser for this format
        assert _chat(server, tools=[WEATHER], tool_choice="none")[0] == 200
    finally:
        engine.tokenizer.chat_template = saved


# -- replies read by the parsers (scripted) -------------------------------------------------------


def test_openai_client_reads_tool_calls(fake, scripted):
    scripted.reply = "Let me check.\n" + CALL + "\n" + CALL.replace("get_weather", "get_time").replace(
        '{"city": "Paris"}', "{}")
    client = _client(fake)
    resp = client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER, TIME], max_tokens=64)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[1].function.arguments == "{}"
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls) and calls[0].id != calls[1].id
    # the reply goes back into the history as the client returns it, with the tools' results
    messages = [*ASK, choice.message, *[{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in calls]]
    scripted.reply = "It is sunny."
    again = client.chat.completions.create(model=M, messages=messages, tools=[WEATHER, TIME], max_tokens=64)
    assert again.choices[0].message.content == "It is sunny." and again.choices[0].finish_reason == "stop"
    # parallel_tool_calls false: the first call only
    scripted.reply = CALL + CALL
    one = client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls(fake, scripted):
    scripted.reply = "Sure.\n" + CALL
    status, _, text = _chat(fake, tools=[WEATHER], stream=True)
    assert status == 200
    events = [e for e in sse_events(text) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}' and len(calls) > 2
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)
    # the openai client's stream reassembles the same call
    stream = _client(fake).chat.completions.create(model=M, messages=ASK, tools=[WEATHER], stream=True)
    args, names, finish = "", [], None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            names += [tc.function.name] if tc.function.name else []
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and json.loads(args) == {"city": "Paris"} and finish == "tool_calls"


def test_tool_choice_none_and_no_tools_leave_the_text_alone(fake, scripted):
    scripted.reply = CALL
    for fields in ({"tools": [WEATHER], "tool_choice": "none"}, {}):
        status, _, body = _chat(fake, **fields)
        assert status == 200 and body["choices"][0]["message"]["content"] == CALL, body
        assert body["choices"][0]["finish_reason"] == "stop"


def test_qwen3_reasoning(thinking, fake, scripted):
    scripted.reply = "<think>\nThe user greets me.\n</think>\n\nHello!"
    msg = _client(thinking).chat.completions.create(model=M, messages=ASK).choices[0].message
    assert msg.content == "Hello!" and msg.reasoning_content == "The user greets me."
    status, _, text = _chat(thinking, stream=True)
    deltas = [e["choices"][0]["delta"] for e in sse_events(text) if e != "[DONE]"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me."
    assert "".join(d.get("content", "") for d in deltas) == "Hello!"
    # enable_thinking false: the prompt holds an empty think block, and the reply is all content
    scripted.reply = "Hello, no thinking."
    _, _, body = _chat(thinking, chat_template_kwargs={"enable_thinking": False})
    assert body["choices"][0]["message"]["content"] == "Hello, no thinking."
    assert body["choices"][0]["message"]["reasoning_content"] is None
    # without --reasoning-parser the think block is content, as before
    scripted.reply = "<think>x</think>y"
    assert _chat(fake)[2]["choices"][0]["message"] == {"role": "assistant", "content": "<think>x</think>y",
                                                       "refusal": None}
    # thinking, then a call
    scripted.reply = "<think>weather</think>" + CALL
    _, _, body = _chat(thinking, tools=[WEATHER])
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "weather" and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_forced_replies_are_read_as_calls(thinking, scripted, monkeypatch):
    """What the server does with a forced reply; the schema's enforcement itself is structured
    output's (stood in for here: the scripted reply is one the schema allows)."""
    import radixserve.server.tools as tools

    schemas = []
    monkeypatch.setattr(tools, "structured_output", lambda schema: schemas.append(schema) or {})
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, reply in (("required", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
                          (named, '{"city": "Paris"}')):
        scripted.reply = reply
        for stream in (False, True):
            status, _, answer = _chat(thinking, tools=[WEATHER, TIME], tool_choice=choice, stream=stream)
            assert status == 200, answer
            if stream:
                events = [e for e in sse_events(answer) if e != "[DONE]"]
                calls = [d["tool_calls"][0] for d in (e["choices"][0]["delta"] for e in events) if "tool_calls" in d]
                assert calls[0]["function"]["name"] == "get_weather"
                assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
                assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
            else:
                message = answer["choices"][0]["message"]
                assert message["content"] is None and answer["choices"][0]["finish_reason"] == "tool_calls"
                assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                "arguments": '{"city": "Paris"}'}
                assert "reasoning_content" not in message  # a forced reply is not searched for thinking
    assert schemas[0]["type"] == "array" and schemas[-1] == WEATHER["function"]["parameters"]
