"""vLLM's /tokenize and /detokenize, /version, and the model card's root, on a real server."""

from __future__ import annotations

import pytest
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)

import radixserve

M = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "What is a radix tree?"}]


def test_tokenize_a_prompt_as_the_tokenizer_does(server, engine):
    tok = engine.tokenizer
    status, _, body = http(server.url + "/tokenize", "POST", {"model": M, "prompt": "Hello radix trees"})
    assert status == 200, body
    want = tok.encode("Hello radix trees", add_special_tokens=True)
    assert body["tokens"] == want and body["count"] == len(want)
    assert body["max_model_len"] == engine.context_limit
    assert "token_strs" not in body
    _, _, plain = http(server.url + "/tokenize", "POST", {"prompt": "Hello radix trees", "add_special_tokens": False,
                                                          "return_token_strs": True})
    assert plain["tokens"] == tok.encode("Hello radix trees", add_special_tokens=False)
    assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"])


def test_tokenize_messages_as_chat_does(server, engine):
    status, _, body = http(server.url + "/tokenize", "POST", {"messages": MSGS})
    assert status == 200, body
    assert body["tokens"] == engine.apply_chat_template(MSGS)
    _, _, bare = http(server.url + "/tokenize", "POST", {"messages": MSGS, "add_generation_prompt": False})
    assert bare["tokens"] == engine.apply_chat_template(MSGS, add_generation_prompt=False)
    assert bare["count"] < body["count"]  # the assistant's turn header is left out
    # The count is what a chat completion reports as its prompt tokens.
    _, _, chat = http(server.url + "/v1/chat/completions", "POST", {"model": M, "messages": MSGS, "max_tokens": 1})
    assert chat["usage"]["prompt_tokens"] == body["count"]


def test_detokenize_round_trips(server, engine):
    ids = engine.tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    status, _, body = http(server.url + "/detokenize", "POST", {"model": M, "tokens": ids})
    assert status == 200 and body == {"prompt": "The capital of France is Paris."}
    assert http(server.url + "/detokenize", "POST", {"tokens": []})[2] == {"prompt": ""}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": MSGS}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-17"}, "model"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"messages": MSGS, "add_special_tokens": False}, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, "return_token_strs"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
    ("/detokenize", {"tokens": [1, 49152]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_tokenizer_requests_are_a_400_naming_the_field(server, engine, path, body, param):
    status, headers, err = http(server.url + path, "POST", body)
    assert status == 400, err
    assert err["error"]["param"] == param, err
    assert headers["Content-Type"].startswith("application/json")


def test_version_and_the_model_cards_root(server, engine):
    assert http(server.url + "/version")[2] == {"version": radixserve.__version__}
    _, _, models = http(server.url + "/v1/models")
    card = models["data"][0]
    assert card["root"] == str(engine.model_path) and card["parent"] is None
    assert http(server.url + f"/v1/models/{M}")[2]["root"] == card["root"]
