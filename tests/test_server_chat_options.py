"""vLLM's chat template controls and message names, and SGLang's max_new_tokens, on a real server."""

from __future__ import annotations

import pytest
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)

M = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
PARTIAL = [*ASK, {"role": "assistant", "content": "The capital of France is"}]


def _chat(server, messages, **fields):
    body = {"model": M, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    return http(server.url + "/v1/chat/completions", "POST", body)


def test_add_generation_prompt_false_leaves_the_assistant_header_out(server, engine):
    status, _, with_header = _chat(server, ASK)
    assert status == 200, with_header
    _, _, without = _chat(server, ASK, add_generation_prompt=False)
    want = engine.apply_chat_template(ASK, add_generation_prompt=False)
    assert without["usage"]["prompt_tokens"] == len(want) < with_header["usage"]["prompt_tokens"]


def test_continue_final_message_continues_the_assistants_words(server, engine):
    status, _, body = _chat(server, PARTIAL, add_generation_prompt=False, continue_final_message=True)
    assert status == 200, body
    ids = engine.apply_chat_template(PARTIAL, add_generation_prompt=False, continue_final_message=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert engine.tokenizer.decode(ids).endswith("The capital of France is")  # open, no end-of-turn
    assert "Paris" in body["choices"][0]["message"]["content"]
    _, _, counted = http(server.url + "/tokenize", "POST", {"messages": PARTIAL, "add_generation_prompt": False,
                                                            "continue_final_message": True})
    assert counted["tokens"] == ids


def test_a_message_name_reaches_the_template(server, engine):
    named = [{"role": "user", "content": "Hi", "name": "ada"}]
    status, _, body = _chat(server, named)
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(engine.apply_chat_template(named))


def test_chat_template_kwargs_are_template_variables(make_engine, smollm_path):
    engine = make_engine(smollm_path)
    engine.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}(no thinking)\n{% endif %}"
    )
    plain = engine.apply_chat_template(ASK)
    quiet = engine.apply_chat_template(ASK, chat_template_kwargs={"enable_thinking": False})
    assert engine.tokenizer.decode(quiet).endswith("(no thinking)\n") and len(quiet) > len(plain)
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        engine.apply_chat_template(ASK, chat_template_kwargs={"tokenize": False})


@pytest.mark.parametrize("fields, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # needs add_generation_prompt false
    ({"add_generation_prompt": False, "continue_final_message": True, "messages": ASK}, "continue_final_message"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "Hi", "name": 5}]}, "messages[0].name"),
])
def test_bad_chat_options_are_a_400_naming_the_field(server, engine, fields, param):
    messages = fields.pop("messages", PARTIAL)
    status, _, err = _chat(server, messages, **fields)
    assert status == 400, err
    assert err["error"]["param"] == param, err


def test_generate_takes_sglangs_max_new_tokens(server, engine):
    status, _, body = http(server.url + "/generate", "POST", {"text": "Hello", "sampling_params": {
        "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    assert status == 200 and body["completion_tokens"] == 3, body
    status, _, err = http(server.url + "/generate", "POST", {"text": "Hello", "sampling_params": {
        "max_new_tokens": 3, "max_tokens": 3}})
    assert status == 400 and err["error"]["param"] == "sampling_params.max_new_tokens", err
