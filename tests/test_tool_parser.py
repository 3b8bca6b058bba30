"""Tool call and reasoning parsers (server/tool_parser.py, reasoning.py, chat_output.py): whole texts,
and streams split anywhere, which must give what the whole text gives."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.server.chat_output import OutputFormat
from radixserve.server.reasoning import ReasoningParser
from radixserve.server.tool_formats import make_parser
from radixserve.server.tool_parser import CONTENT, collect, parse_whole


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _streamed(fmt: str, chunks: list[str], max_calls: int | None = None):
    parser = make_parser(fmt, max_calls=max_calls, new_id=_ids())
    pieces = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
    return collect(pieces + parser.finish())


def _whole(fmt: str, text: str, max_calls: int | None = None):
    return parse_whole(make_parser(fmt, max_calls=max_calls, new_id=_ids()), text)


def _calls(parsed) -> list[tuple[str, object]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls]


def _call(name: str, args: str, **kw) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


# (text, content, calls) for hermes
HERMES = [
    ("Plain text, no calls.", "Plain text, no calls.", []),
    (_call("get_weather", '{"city": "Paris"}'), "", [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n\n" + _call("a", "{}") + "\n" + _call("b", '{"n": 2}') + "\n",
     "Let me look.", [("a", {}), ("b", {"n": 2})]),
    ("Before " + _call("a", "{}") + "\nafter.", "Before after.", [("a", {})]),
    (_call("find", '{"q": {"nested": [1, {"deep": "}]"}], "s": "<tool_call>"}, "u": "Zürich 東京 🙂"}'), "",
     [("find", {"q": {"nested": [1, {"deep": "}]"}], "s": "<tool_call>"}, "u": "Zürich 東京 🙂"})]),
    ('<tool_call>{"name": "esc", "arguments": {"s": "a\\"b\\\\"}}</tool_call>', "", [("esc", {"s": 'a"b\\'})]),
    # keys in the other order (Hermes 2 Pro): read whole at the block's end
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "rev"}\n</tool_call>', "", [("rev", {"x": 1})]),
    # arguments written as a JSON string
    ('<tool_call>{"name": "s", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("s", {"x": 1})]),
    # not JSON at all: content, markup included
    ("Hi <tool_call>get_weather(city='Paris')</tool_call>", "Hi <tool_call>get_weather(city='Paris')</tool_call>",
     []),
    ('<tool_call>{"name": 5, "arguments": {}}</tool_call>', '<tool_call>{"name": 5, "arguments": {}}</tool_call>', []),
    # a tag that never completes, and a lone "<"
    ("a < b and <tool", "a < b and <tool", []),
    # a block cut off before its header: content
    ('text <tool_call>{"na', 'text <tool_call>{"na', []),
    # unclosed block that still reads whole
    ('<tool_call>{"arguments": {}, "name": "late"}', "", [("late", {})]),
]


@pytest.mark.parametrize("text, content, calls", HERMES)
def test_hermes_whole_texts(text, content, calls):
    parsed = _whole("hermes", text)
    assert parsed.content == content
    assert _calls(parsed) == calls
    assert [c["id"] for c in parsed.calls] == [f"call_{i}" for i in range(len(calls))]


@pytest.mark.parametrize("text, content, calls", HERMES)
def test_hermes_streams_split_at_every_boundary_match_the_whole_text(text, content, calls):
    whole = _whole("hermes", text)
    for cut in range(len(text) + 1):
        assert _streamed("hermes", [text[:cut], text[cut:]]) == whole, cut
    assert _streamed("hermes", list(text)) == whole
    for size in (2, 3, 7):
        assert _streamed("hermes", [text[i:i + size] for i in range(0, len(text), size)]) == whole


def test_hermes_streams_arguments_as_they_are_written():
    text = "Sure.\n" + _call("get_weather", '{"city": "Paris", "unit": "c"}')
    parser = make_parser("hermes", new_id=_ids())
    pieces = []
    for c in text:
        pieces.append(parser.feed(c))
    pieces.append(parser.finish())
    flat = [p for step in pieces for p in step]
    assert "".join(p.text for p in flat if p.kind == CONTENT) == "Sure."
    call = [p for p in flat if p.kind != CONTENT][0]
    assert call.kind == "call" and call.text == "get_weather" and call.call_id == "call_0"
    args = [p.text for p in flat if p.kind == "args"]
    assert len(args) > 10 and "".join(args) == '{"city": "Paris", "unit": "c"}'  # one fragment per character
    assert all("<" not in p.text for p in flat if p.kind == CONTENT)


def test_malformed_arguments_leave_the_whole_reply_as_content():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>'
    parsed = _whole("hermes", text)
    assert parsed.content == text and parsed.calls == []
    cut = 'x <tool_call>{"name": "f", "arguments": {"a": "unfinis'  # cut off by max_tokens
    assert _whole("hermes", cut).content == cut
    # a stream has already announced such a call: it keeps what the model wrote
    assert _streamed("hermes", list(cut)).calls[0]["function"]["arguments"] == '{"a": "unfinis'


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    text = _call("a", "{}") + _call("b", "{}") + " done"
    for parsed in (_whole("hermes", text, max_calls=1), _streamed("hermes", list(text), max_calls=1)):
        assert _calls(parsed) == [("a", {})] and parsed.content == "done"


LLAMA = [
    ('{"name": "f", "parameters": {"x": 1}}', "", [("f", {"x": 1})]),
    ('<|python_tag|>{"name": "f", "parameters": {"x": {"y": [1, 2]}}}; {"name": "g", "arguments": {}}', "",
     [("f", {"x": {"y": [1, 2]}}), ("g", {})]),
    ('  {"parameters": {"city": "Zürich"}, "name": "w"}', "", [("w", {"city": "Zürich"})]),
    ("The answer is 4.", "The answer is 4.", []),
    ('{"answer": 4}', '{"answer": 4}', []),
    ('Text first {"name": "f", "parameters": {}}', 'Text first {"name": "f", "parameters": {}}', []),
    ('{"name": "f", "parameters": {}} and then words', "and then words", [("f", {})]),
    ("<|python_ta", "<|python_ta", []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA)
def test_llama3_json(text, content, calls):
    whole = _whole("llama3_json", text)
    assert (whole.content, _calls(whole)) == (content, calls)
    for cut in range(len(text) + 1):
        assert _streamed("llama3_json", [text[:cut], text[cut:]]) == whole, cut


def test_forced_formats_read_a_conforming_reply():
    required = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"s": "[]"}}]'
    whole = _whole("required", required)
    assert (whole.content, _calls(whole)) == ("", [("f", {"x": 1}), ("g", {"s": "[]"})])
    assert _streamed("required", list(required)) == whole
    named = '{"city": "Paris", "days": [1, 2]}'
    whole = _whole("named:forecast", named)
    assert (whole.content, _calls(whole)) == ("", [("forecast", {"city": "Paris", "days": [1, 2]})])
    assert _streamed("named:forecast", list(named)) == whole


# -- random texts ----------------------------------------------------------------------------

ARG_VALUES = st.recursive(
    st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)
CALLS = st.builds(lambda name, args, ascii_only: _call(name, json.dumps(args, ensure_ascii=ascii_only)),
                  st.sampled_from(["f", "get_weather", "ü"]), st.dictionaries(st.text(max_size=4), ARG_VALUES,
                                                                               max_size=3), st.booleans())
JUNK = st.sampled_from(["<tool_call>oops</tool_call>", "<tool", "<", "</tool_call>", '{"name": 1}', "\n", "  "])
TEXT = st.text(alphabet=st.sampled_from(list("ab <>{}\"\\ \n\tü🙂")), max_size=8)
SEGMENTS = st.lists(st.one_of(TEXT, CALLS, JUNK), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=SEGMENTS, cuts=st.lists(st.integers(0, 400), max_size=6), fmt=st.sampled_from(["hermes", "llama3_json"]))
def test_any_split_of_any_text_gives_the_same_pieces(text, cuts, fmt):
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    streamed = _streamed(fmt, chunks)
    assert streamed == _streamed(fmt, [text])
    whole = _whole(fmt, text)
    if whole.calls or not streamed.calls:  # the whole reading differs only where it gave up on a call
        assert streamed == whole


@settings(max_examples=100, deadline=None)
@given(calls=st.lists(CALLS, min_size=1, max_size=3), before=TEXT.filter(lambda t: "<" not in t))
def test_well_formed_calls_are_all_found(calls, before):
    parsed = _whole("hermes", before + "".join(calls))
    assert len(parsed.calls) == len(calls)
    assert "<tool_call>" not in parsed.content and parsed.content == (before.rstrip() if before.strip() else "")


# -- reasoning --------------------------------------------------------------------------------

REASONING = [
    # (parser, prompt tail, text, reasoning, content)
    ("qwen3", "", "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Hmm.\n</think>\n\nFour.", "Hmm.", "Four."),
    ("qwen3", "<think>\n\n</think>\n\n", "Four.", "", "Four."),  # enable_thinking false
    ("qwen3", "", "Four, no thinking.", "", "Four, no thinking."),
    ("qwen3", "", "Text with </think> inside", "", "Text with </think> inside"),
    ("qwen3", "", "<think>cut off befo", "cut off befo", ""),
    ("qwen3", "", "  <thinking> is not a tag", "", "  <thinking> is not a tag"),
    ("deepseek_r1", "", "All reasoning, <b> and </thin", "All reasoning, <b> and </thin", ""),
    ("deepseek_r1", "", "<think>R1 <think> 🙂</think>Answer", "R1 <think> 🙂", "Answer"),
]


def _reason(name, tail, chunks):
    parser = ReasoningParser(name, prompt_tail=tail)
    pieces = [p for c in chunks for p in parser.feed(c)] + parser.finish()
    return ("".join(p.text for p in pieces if p.kind == "reasoning"),
            "".join(p.text for p in pieces if p.kind == CONTENT))


@pytest.mark.parametrize("name, tail, text, reasoning, content", REASONING)
def test_reasoning_split_anywhere(name, tail, text, reasoning, content):
    assert _reason(name, tail, [text]) == (reasoning, content)
    for cut in range(len(text) + 1):
        assert _reason(name, tail, [text[:cut], text[cut:]]) == (reasoning, content), cut
    assert _reason(name, tail, list(text)) == (reasoning, content)


def test_reasoning_then_tool_calls_in_one_reply():
    fmt = OutputFormat(tools="hermes", reasoning="qwen3")
    text = "<think>\nThe user wants weather.\n</think>\n\n" + _call("get_weather", '{"city": "Paris"}')
    message, called = fmt.message(text)
    assert called and message["reasoning_content"] == "The user wants weather." and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert message["tool_calls"][0]["id"].startswith("call_") and message["tool_calls"][0]["type"] == "function"
    parser = fmt.parser()
    deltas = [d for c in text for d in parser.feed(c)] + parser.feed("", last=True)
    assert parser.called
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "The user wants weather." and not any("content" in d for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls[1:]) == '{"city": "Paris"}'
    assert all(set(c) == {"index", "function"} for c in calls[1:])


def test_without_parsers_nothing_changes():
    message, called = OutputFormat().message("<think>x</think><tool_call>{}</tool_call>")
    assert not called and message == {"role": "assistant", "content": "<think>x</think><tool_call>{}</tool_call>",
                                       "refusal": None}
