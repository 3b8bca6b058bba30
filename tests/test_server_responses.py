"""/v1/responses through the official openai client (create, streaming, the stream helper,
retrieve, previous_response_id), checked against the engine's own chat output."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
from helpers.server import engine, http, leak_check, server  # noqa: F401,E402 (fixtures)

from radixserve import SamplingParams  # noqa: E402
from radixserve.server import BackgroundServer, ServerConfig  # noqa: E402
from radixserve.server.response_store import ResponseStore  # noqa: E402

M = "smollm2-135m-instruct"
ASK = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_chat(engine, messages, n: int) -> tuple[str, str | None]:
    out = engine.chat(messages, SamplingParams(max_tokens=n, temperature=0))
    return out.text, out.finish_reason


def test_create_matches_the_engines_chat(client, engine):
    got = client.responses.create(model=M, input=ASK, max_output_tokens=6, temperature=0, store=False)
    text, finish = greedy_chat(engine, [{"role": "user", "content": ASK}], 6)
    assert got.object == "response" and got.id.startswith("resp_") and got.model == M
    assert got.output_text == text and got.output[0].role == "assistant" and got.output[0].type == "message"
    assert got.output[0].content[0].type == "output_text"
    assert got.usage.input_tokens == len(engine.apply_chat_template([{"role": "user", "content": ASK}]))
    assert got.usage.output_tokens == 6 and got.usage.total_tokens == got.usage.input_tokens + 6
    assert finish == "length" and got.status == "incomplete"
    assert got.incomplete_details.reason == "max_output_tokens"
    done = client.responses.create(model=M, input=ASK, max_output_tokens=60, temperature=0, store=False)
    assert done.status == "completed" and done.incomplete_details is None and "Paris" in done.output_text


def test_instructions_and_message_items_reach_the_template(client, engine):
    items = [
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a color."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"role": "user", "content": "Another one."},
    ]
    got = client.responses.create(model=M, input=items, instructions="You are terse.", max_output_tokens=5,
                                  temperature=0, store=False, metadata={"k": "v"}, user="u1")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one."}]
    assert got.usage.input_tokens == len(engine.apply_chat_template(messages))
    assert got.output_text == greedy_chat(engine, messages, 5)[0]
    assert got.instructions == "You are terse." and got.metadata == {"k": "v"} and got.user == "u1"


def test_top_p_and_temperature_are_honoured(client):
    greedy = client.responses.create(model=M, input=ASK, max_output_tokens=8, temperature=0, store=False)
    narrow = client.responses.create(model=M, input=ASK, max_output_tokens=8, temperature=1.0, top_p=1e-6,
                                     store=False)
    assert narrow.output_text == greedy.output_text  # only the most likely token survives top_p
    assert narrow.temperature == 1.0 and narrow.top_p == 1e-6


def test_streaming_events_in_order(client):
    whole = client.responses.create(model=M, input=ASK, max_output_tokens=8, temperature=0, store=False)
    events = list(client.responses.create(model=M, input=ASK, max_output_tokens=8, temperature=0, store=False,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == len(kinds) - 8 and deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in deltas) == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 8
    assert events[0].response.status == "in_progress" and final.status == whole.status
    assert len({e.response.id for e in (events[0], events[1], events[-1])}) == 1
    assert {e.item_id for e in deltas} == {events[2].item.id}


def test_the_clients_stream_helper_assembles_the_response(client):
    with client.responses.stream(model=M, input=ASK, max_output_tokens=3, temperature=0, store=False) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text and final.usage.output_tokens == 3
    assert final.status == "incomplete" and final.output[0].status == "incomplete"


def test_previous_response_id_continues_a_stored_conversation(client, engine):
    first = client.responses.create(model=M, input="My name is Ada.", max_output_tokens=6, temperature=0)
    assert first.store is True and client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=M, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    messages = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"}]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == len(engine.apply_chat_template(messages))
    assert second.output_text == greedy_chat(engine, messages, 6)[0]
    streamed = list(client.responses.create(model=M, input="What is my name?", previous_response_id=first.id,
                                            max_output_tokens=6, temperature=0, stream=True))
    assert streamed[-1].response.output_text == second.output_text
    assert client.responses.retrieve(streamed[-1].response.id).output_text == second.output_text  # stored too
    unstored = client.responses.create(model=M, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=M, input="Hi", previous_response_id=unstored.id, max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"


def test_a_server_that_stores_nothing(engine):
    with BackgroundServer(engine, ServerConfig(port=0, responses_store_size=0)) as srv:
        body = {"model": M, "input": "Hi", "max_output_tokens": 2}
        status, _, got = http(srv.url + "/v1/responses", "POST", body)
        assert status == 200 and got["store"] is False, got
        assert http(srv.url + f"/v1/responses/{got['id']}")[0] == 404
        status, _, err = http(srv.url + "/v1/responses", "POST", dict(body, store=True))
        assert status == 400 and err["error"]["param"] == "store"


def test_the_store_is_bounded():
    store = ResponseStore(max_items=2, max_chars=100)

    def put(rid: str, text: str, previous: str | None = None) -> None:
        store.put({"id": rid}, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], previous)

    put("a", "one")
    put("b", "two", "a")
    assert [m["content"] for m in store.conversation("b") or []] == ["one", "ok", "two", "ok"]
    # Rebuilding b's conversation used a last: b is now the least recently used, and goes.
    put("c", "three", "b")
    assert len(store) == 2 and store.get("b") is None and store.conversation("c") is None
    put("d", "x" * 97)  # 99 characters: the rest must go
    assert len(store) == 1 and store.get("d") is not None
    put("e", "y" * 200)  # larger than the whole budget: not stored, nothing evicted
    assert store.get("e") is None and store.get("d") is not None


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": "x", "extra": 1}]}, "input[0].extra"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 10**9}, "max_output_tokens"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": 5}}, "metadata.k"),
    ({"previous_response_id": 5}, "previous_response_id"),
    ({"previous_response_id": "resp_missing"}, "previous_response_id"),
    ({"store": "yes"}, "store"),
    ({"instructions": ["x"]}, "instructions"),
    ({"model": "other"}, "model"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_fields_are_a_400_naming_them(server, fields, param):
    status, _, err = http(server.url + "/v1/responses", "POST",
                          {"model": M, "input": "Hi", "max_output_tokens": 2, **fields})
    assert status == 400, err
    assert err["error"]["param"] == param, err
