"""vLLM's extension fields on chat and completions, and SGLang's sampling_params names on /generate,
each on a real server and checked for its effect (greedy outputs of the built-in model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)

from radixserve import SamplingParams
from radixserve.server.openai_api import parse_completion
from radixserve.server.routes import _keep_last

M = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "Name a color."}]
PARTIAL = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "The capital of France is"}]
COUNT = "Count: 1, 2, 3,"


def _post(server, route: str, body: dict, status: int = 200):
    got, _, answer = http(server.url + route, "POST", body)
    assert got == status, answer
    return answer


def complete(server, prompt, **fields) -> dict:
    body = {"model": M, "prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}
    return _post(server, "/v1/completions", body)


def chat(server, messages=MSGS, **fields) -> dict:
    body = {"model": M, "messages": messages, "max_tokens": 8, "temperature": 0, **fields}
    return _post(server, "/v1/chat/completions", body)


def stream(server, route: str, body: dict) -> list[dict]:
    status, _, text = http(server.url + route, "POST", dict(body, model=M, stream=True))
    assert status == 200, text
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    return events[:-1]


# -- stop strings, special tokens, token ids -------------------------------------------------


def test_include_stop_str_in_output_keeps_the_stop_string(server):
    free = complete(server, COUNT, ignore_eos=True)["choices"][0]["text"]
    stop = free[4:7]
    cut = complete(server, COUNT, stop=[stop], ignore_eos=True)["choices"][0]
    kept = complete(server, COUNT, stop=[stop], ignore_eos=True, include_stop_str_in_output=True)["choices"][0]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    assert cut["text"] == free[: free.index(stop)]
    assert kept["text"] == free[: free.index(stop) + len(stop)]


def test_skip_special_tokens_false_shows_the_end_of_turn(server, engine):
    eos = engine.tokenizer.eos_token_id
    shown = chat(server, max_tokens=40, ignore_eos=True, skip_special_tokens=False, return_token_ids=True)
    hidden = chat(server, max_tokens=40, ignore_eos=True, return_token_ids=True)
    ids = shown["choices"][0]["token_ids"]
    assert eos in ids and ids == hidden["choices"][0]["token_ids"]  # greedy: the reply ends its turn
    marker = engine.tokenizer.decode([eos])
    assert marker in shown["choices"][0]["message"]["content"]
    assert marker not in hidden["choices"][0]["message"]["content"]
    assert shown["choices"][0]["message"]["content"] == engine.tokenizer.decode(ids, skip_special_tokens=False)


def test_return_token_ids_on_completions(server, engine):
    body = complete(server, COUNT, return_token_ids=True, ignore_eos=True, n=2, temperature=0.8, seed=5)
    prompt_ids = engine.tokenizer.encode(COUNT)
    for c in body["choices"]:
        assert c["prompt_token_ids"] == prompt_ids
        assert len(c["token_ids"]) == 8 and engine.tokenizer.decode(c["token_ids"]) == c["text"]
    plain = complete(server, COUNT, ignore_eos=True)
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]
    chunks = stream(server, "/v1/completions", {"prompt": COUNT, "max_tokens": 8, "temperature": 0.8, "seed": 5,
                                                "n": 2, "ignore_eos": True, "return_token_ids": True})
    for i, c in enumerate(body["choices"]):
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == prompt_ids  # once, on the choice's first chunk
        assert all("prompt_token_ids" not in ch for ch in mine[1:])
        assert [t for ch in mine for t in ch["token_ids"]] == c["token_ids"]


def test_return_token_ids_on_chat(server, engine):
    body = chat(server, return_token_ids=True, ignore_eos=True)
    assert body["prompt_token_ids"] == engine.apply_chat_template(MSGS)
    ids = body["choices"][0]["token_ids"]
    assert len(ids) == 8 and engine.tokenizer.decode(ids) == body["choices"][0]["message"]["content"]
    chunks = stream(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, "temperature": 0,
                                                     "ignore_eos": True, "return_token_ids": True})
    assert chunks[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == ids


def test_return_tokens_as_token_ids_in_logprobs(server):
    body = complete(server, COUNT, logprobs=2, return_token_ids=True, return_tokens_as_token_ids=True,
                    ignore_eos=True)["choices"][0]
    lp = body["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in body["token_ids"]]
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)
    plain = complete(server, COUNT, logprobs=2, ignore_eos=True)["choices"][0]["logprobs"]
    assert lp["text_offset"] == plain["text_offset"]  # offsets still count characters of the text
    got = chat(server, logprobs=True, top_logprobs=1, return_token_ids=True, return_tokens_as_token_ids=True,
               ignore_eos=True)["choices"][0]
    content = got["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in got["token_ids"]]
    assert content[0]["top_logprobs"][0]["token"].startswith("token_id:")


def test_continuous_usage_stats_put_the_usage_on_every_chunk(server):
    chunks = stream(server, "/v1/chat/completions", {
        "messages": MSGS, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "stream_options": {"continuous_usage_stats": True}})
    assert all(c["usage"] is not None for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 6
    assert chunks[-1]["choices"] == []  # include_usage is implied: the closing usage chunk is there
    assert len({c["usage"]["prompt_tokens"] for c in chunks}) == 1
    plain = stream(server, "/v1/completions", {"prompt": COUNT, "max_tokens": 3, "temperature": 0,
                                               "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 3


# -- prompt truncation -----------------------------------------------------------------------


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, engine):
    ids = engine.tokenizer.encode("One two three four five six seven eight nine ten")
    got = complete(server, ids, truncate_prompt_tokens=4, ignore_eos=True, echo=True, max_tokens=4)
    want = engine.generate([ids[-4:]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           progress=False)[0]
    assert got["usage"]["prompt_tokens"] == 4
    assert got["choices"][0]["text"] == engine.tokenizer.decode(ids[-4:]) + want.text  # echo shows what ran
    whole = complete(server, ids, truncate_prompt_tokens=100, max_tokens=2)  # longer than the prompt: all of it
    assert whole["usage"]["prompt_tokens"] == len(ids)
    fits = complete(server, ids, truncate_prompt_tokens=-1, max_tokens=2)
    assert fits["usage"]["prompt_tokens"] == len(ids)
    short = chat(server, truncate_prompt_tokens=3, return_token_ids=True)
    assert short["prompt_token_ids"] == engine.apply_chat_template(MSGS)[-3:]
    assert short["usage"]["prompt_tokens"] == 3


def test_truncate_minus_one_leaves_room_for_max_tokens():
    def keep(body: dict, limit: int) -> int | None:
        req = parse_completion(dict({"model": "m", "prompt": "x"}, **body), "m")
        return _keep_last(SimpleNamespace(context_limit=limit), req)  # type: ignore[arg-type]

    assert keep({"truncate_prompt_tokens": -1, "max_tokens": 10}, 100) == 90
    assert keep({"truncate_prompt_tokens": -1}, 100) == 84  # completions' default max_tokens, 16
    assert keep({"truncate_prompt_tokens": 7}, 100) == 7
    assert keep({}, 100) is None


def test_truncation_lets_a_prompt_past_the_context_run(server, engine):
    limit = server.state.context_limit
    ids = (engine.tokenizer.encode(" a") * (limit + 10))[: limit + 10]
    status, _, err = http(server.url + "/v1/completions", "POST", {"model": M, "prompt": ids, "max_tokens": 1})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    got = complete(server, ids, truncate_prompt_tokens=8, max_tokens=1)
    assert got["usage"]["prompt_tokens"] == 8


# -- chat: echo, min_tokens, stop ids, sampling extensions ------------------------------------


def test_chat_echo_prepends_the_last_message_of_the_replys_role(server):
    options = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    plain = chat(server, PARTIAL, **options)["choices"][0]["message"]
    echoed = chat(server, PARTIAL, echo=True, **options)["choices"][0]["message"]
    assert echoed["role"] == "assistant"
    assert echoed["content"] == "The capital of France is" + plain["content"]
    chunks = stream(server, "/v1/chat/completions", {"messages": PARTIAL, "echo": True, "max_tokens": 8,
                                                     "temperature": 0, **options})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == echoed["content"]
    # With a generation prompt the reply is the assistant's and the last message the user's: nothing to echo.
    assert chat(server, echo=True)["choices"][0]["message"] == chat(server)["choices"][0]["message"]
    # Without one, the reply continues the last message in its role (vLLM's rule).
    user = chat(server, echo=True, add_generation_prompt=False)["choices"][0]["message"]
    assert user["role"] == "user" and user["content"].startswith("Name a color.")


def test_min_tokens_and_stop_token_ids_in_chat(server, engine):
    free = chat(server, max_tokens=40, return_token_ids=True)["choices"][0]
    assert free["finish_reason"] == "stop" and len(free["token_ids"]) < 30
    longer = chat(server, max_tokens=40, min_tokens=30, return_token_ids=True)["choices"][0]
    assert len(longer["token_ids"]) >= 30
    third = free["token_ids"][2]
    stopped = chat(server, max_tokens=40, stop_token_ids=[third], return_token_ids=True)["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["token_ids"][: free["token_ids"].index(third)] == free["token_ids"][: free["token_ids"].index(third)]
    assert len(stopped["token_ids"]) <= free["token_ids"].index(third) + 1


def test_ignore_eos_top_k_min_p_and_repetition_penalty_change_the_output(server):
    assert chat(server, max_tokens=40)["choices"][0]["finish_reason"] == "stop"
    full = chat(server, max_tokens=40, ignore_eos=True)
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 40
    greedy = complete(server, COUNT, ignore_eos=True)["choices"][0]["text"]
    for only_the_top in ({"top_k": 1}, {"min_p": 1.0}):  # sampling at temperature 1 from the argmax alone
        assert complete(server, COUNT, ignore_eos=True, temperature=1.0, seed=1,
                        **only_the_top)["choices"][0]["text"] == greedy
    assert complete(server, COUNT, ignore_eos=True, repetition_penalty=2.0)["choices"][0]["text"] != greedy


def _repeats(prompt_ids: list[int], ids: list[int]) -> int:
    """How many generated tokens already stood in the prompt or earlier in the output."""
    return sum(1 for i, t in enumerate(ids) if t in prompt_ids or t in ids[:i])


def test_repetition_penalty_works_the_way_vllm_documents_it(server, engine):
    """Above 1 the reply turns to new tokens, below 1 it repeats (greedy, 16 tokens)."""
    ids = engine.tokenizer.encode(COUNT)
    repeats = {}
    for penalty in (0.5, 1.0, 1.5):
        got = complete(server, COUNT, ignore_eos=True, max_tokens=16, return_token_ids=True,
                       repetition_penalty=penalty)["choices"][0]
        repeats[penalty] = _repeats(ids, got["token_ids"])
    assert repeats[1.5] < repeats[1.0] < repeats[0.5] == 16, repeats
    chat_ids = engine.apply_chat_template(MSGS)
    free = chat(server, ignore_eos=True, max_tokens=16, return_token_ids=True)["choices"][0]["token_ids"]
    fresh = chat(server, ignore_eos=True, max_tokens=16, return_token_ids=True,
                 repetition_penalty=1.5)["choices"][0]["token_ids"]
    assert _repeats(chat_ids, fresh) < _repeats(chat_ids, free)


def test_allowed_token_ids_and_bad_words_on_completions_and_chat(server, engine):
    """allowed_token_ids: every token from the list; bad_words: the word's tokens never in a row."""
    tok = engine.tokenizer
    allowed = sorted(set(tok.encode(" red green blue, and", add_special_tokens=False)))
    body = complete(server, COUNT, allowed_token_ids=allowed, return_token_ids=True, ignore_eos=True,
                    temperature=1.0, seed=3, n=2)
    for c in body["choices"]:
        assert len(c["token_ids"]) == 8 and set(c["token_ids"]) <= set(allowed), c
    got = chat(server, allowed_token_ids=allowed, return_token_ids=True, temperature=0)["choices"][0]
    assert got["token_ids"] and set(got["token_ids"]) <= set(allowed), got  # may end at once: EOS is allowed
    free = complete(server, COUNT, return_token_ids=True, ignore_eos=True)["choices"][0]
    word = free["text"].split()[1]  # a word of the free greedy reply, e.g. "5,"
    banned = complete(server, COUNT, return_token_ids=True, ignore_eos=True, bad_words=[word])["choices"][0]
    assert banned["token_ids"] != free["token_ids"]
    for spelling in (word, " " + word):
        seq = tok.encode(spelling, add_special_tokens=False)
        ids = banned["token_ids"]
        assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids))), (spelling, banned)


def test_beam_search_fields_and_spaces_between_special_tokens_only_as_implemented(server):
    assert complete(server, COUNT, length_penalty=1.0, use_beam_search=False, spaces_between_special_tokens=True,
                    priority=0, max_tokens=1)["usage"]["completion_tokens"] == 1


def test_request_id_names_the_response(server):
    assert complete(server, COUNT, request_id="job-7", max_tokens=1)["id"] == "cmpl-job-7"
    assert chat(server, request_id="job-8", max_tokens=1)["id"] == "chatcmpl-job-8"
    chunks = stream(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "request_id": "job-9"})
    assert {c["id"] for c in chunks} == {"chatcmpl-job-9"}


@pytest.mark.parametrize("route, fields, param", [
    ("/v1/completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": "3"}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
    ("/v1/completions", {"return_token_ids": "yes"}, "return_token_ids"),
    ("/v1/completions", {"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),  # no logprobs
    ("/v1/chat/completions", {"return_tokens_as_token_ids": 1, "logprobs": True}, "return_tokens_as_token_ids"),
    ("/v1/chat/completions", {"echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"continuous_usage_stats": "on"}},
     "stream_options.continuous_usage_stats"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True,
                                                                 "include_usage": False}},
     "stream_options.continuous_usage_stats"),
    ("/v1/completions", {"length_penalty": 0.5}, "length_penalty"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ("/v1/chat/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"priority": 1}, "priority"),
    ("/v1/completions", {"request_id": ""}, "request_id"),
    ("/v1/chat/completions", {"request_id": 5}, "request_id"),
    ("/v1/chat/completions", {"request_id": "a\nb"}, "request_id"),
])
def test_bad_extension_values_are_a_400_naming_the_field(server, route, fields, param):
    first = {"messages": MSGS} if "chat" in route else {"prompt": COUNT}
    err = _post(server, route, {"model": M, "max_tokens": 2, **first, **fields}, status=400)
    assert err["error"]["param"] == param, err


# -- SGLang's /generate names ----------------------------------------------------------------


def test_generate_takes_sglangs_sampling_names(server, engine):
    def gen(**sp) -> dict:
        return _post(server, "/generate", {"text": COUNT, "sampling_params": {"temperature": 0, **sp}})

    free = gen(max_new_tokens=8, ignore_eos=True)
    stop = free["text"][4:7]
    assert gen(max_new_tokens=8, ignore_eos=True, stop=[stop])["text"] == free["text"][: free["text"].index(stop)]
    kept = gen(max_new_tokens=8, ignore_eos=True, stop=[stop], no_stop_trim=True)["text"]
    assert kept == free["text"][: free["text"].index(stop) + len(stop)]
    eos = engine.tokenizer.eos_token_id
    early = gen(max_new_tokens=8, stop_token_ids=[free["outputs"][0]["token_ids"][1]])
    assert early["completion_tokens"] <= 2 and early["outputs"][0]["finish_reason"] == "stop"
    at_least = gen(max_new_tokens=8, min_new_tokens=8, stop_token_ids=[free["outputs"][0]["token_ids"][1], eos])
    assert at_least["completion_tokens"] == 8
    sampled = [gen(max_new_tokens=6, temperature=1.0, sampling_seed=9, ignore_eos=True)["text"] for _ in range(2)]
    assert sampled[0] == sampled[1] == gen(max_new_tokens=6, temperature=1.0, seed=9, ignore_eos=True)["text"]
    neutral = gen(max_new_tokens=2, spaces_between_special_tokens=True, skip_special_tokens=False)
    assert neutral["completion_tokens"] == 2


@pytest.mark.parametrize("sp, param", [
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "sampling_params.min_new_tokens"),
    ({"min_new_tokens": 1, "min_tokens": 1}, "sampling_params.min_new_tokens"),
    ({"no_stop_trim": "yes"}, "sampling_params.no_stop_trim"),
    ({"sampling_seed": "7"}, "sampling_params.sampling_seed"),
    ({"sampling_seed": 1, "seed": 1}, "sampling_params.sampling_seed"),
    ({"max_new_tokens": -1}, "sampling_params.max_new_tokens"),
    ({"spaces_between_special_tokens": False}, "sampling_params.spaces_between_special_tokens"),
])
def test_bad_sglang_names_are_a_400_naming_them(server, sp, param):
    err = _post(server, "/generate", {"text": "Hi", "sampling_params": sp}, status=400)
    assert err["error"]["param"] == param, err
