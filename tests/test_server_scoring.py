"""Scoring over HTTP: completions with echo and logprobs as lm-evaluation-harness's `local-completions`
posts and reads them, max_tokens 0, vLLM's prompt_logprobs (completions and chat), and SGLang's
return_logprob on /generate. Values are checked against the engine called directly, whose prompt
logprobs tests/test_prompt_logprobs.py checks against transformers."""

from __future__ import annotations

import pytest
from helpers.server import engine, http, leak_check, server, sse_events  # noqa: F401 (fixtures)

from radixserve import SamplingParams

CONTEXT = "Question: What is the capital of France?\nAnswer:"
CONTINUATION = " Paris"


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.state.model_name


def direct(engine, ids: list[int], k: int):
    return engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k), progress=False)[0]


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness's local-completions does with a choice (its parse_logprobs)."""
    logprobs = choice["logprobs"]
    total = sum(logprobs["token_logprobs"][ctxlen:-1])
    is_greedy = True
    for tok, top in zip(logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1]):
        if tok != max(top.values()):
            is_greedy = False
            break
    return total, is_greedy


def test_loglikelihood_request_as_lm_eval_sends_it(server, engine, model):
    tok = engine.tokenizer
    ctx = tok.encode(CONTEXT)
    cont = tok.encode(CONTINUATION, add_special_tokens=False)
    ids = ctx + cont
    body = {"model": model, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    status, _, got = http(server.url + "/v1/completions", "POST", body)
    assert status == 200, got
    (choice,) = got["choices"]
    lp = choice["logprobs"]
    want = direct(engine, ids, 1)
    n = len(ids) + 1  # the prompt's tokens, then the one generated
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [tok.decode([t]) for t in ids + want.token_ids]
    offsets = [0]
    for text in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(text))
    assert lp["text_offset"] == offsets
    for q in range(1, len(ids)):
        entry = want.prompt_logprobs[q]
        assert lp["token_logprobs"][q] == pytest.approx(entry.logprob, abs=1e-5)
        ((text, value),) = lp["top_logprobs"][q].items()
        assert text == tok.decode([entry.top[0][0]]) and value == pytest.approx(entry.top[0][1], abs=1e-5)
    assert choice["text"] == tok.decode(ids) + want.text
    assert choice["finish_reason"] == "length"
    assert got["usage"]["prompt_tokens"] == len(ids) and got["usage"]["completion_tokens"] == 1
    total, is_greedy = lm_eval_parse(choice, len(ctx))
    want_total = sum(e.logprob for e in want.prompt_logprobs[len(ctx):])
    assert total == pytest.approx(want_total, abs=1e-4)
    assert is_greedy == all(e.rank == 1 for e in want.prompt_logprobs[len(ctx):])


def test_greedy_continuation_is_greedy(server, engine, model):
    """A continuation made of the model's own greedy tokens is greedy to lm-eval's check, exactly
    (the token's logprob and the top one's are the same float)."""
    ctx = engine.tokenizer.encode(CONTEXT)
    cont = engine.generate([ctx], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           progress=False)[0].token_ids
    body = {"model": model, "prompt": ctx + cont, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    status, _, got = http(server.url + "/v1/completions", "POST", body)
    assert status == 200, got
    assert lm_eval_parse(got["choices"][0], len(ctx))[1] is True
    # One token changed to something else: not greedy.
    body["prompt"] = ctx + [cont[0] + 1] + cont[1:]
    _, _, got = http(server.url + "/v1/completions", "POST", body)
    assert lm_eval_parse(got["choices"][0], len(ctx))[1] is False


def test_max_tokens_zero_with_echo(server, engine, model):
    """The prompt alone, scored: the echoed text and its logprobs, nothing generated; the openai
    client reads it."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.completions.create(model=model, prompt=CONTEXT, max_tokens=0, echo=True, logprobs=2)
    choice = got.choices[0]
    ids = engine.tokenizer.encode(CONTEXT)
    assert choice.text == CONTEXT and choice.finish_reason == "length"
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.token_logprobs) == len(ids) and choice.logprobs.token_logprobs[0] is None
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    want = direct(engine, ids, 0)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]],
                                                               abs=1e-5)
    # Without echo: nothing at all, and two completions of nothing.
    status, _, body = http(server.url + "/v1/completions", "POST",
                           {"model": model, "prompt": CONTEXT, "max_tokens": 0, "n": 2})
    assert status == 200 and [c["text"] for c in body["choices"]] == ["", ""]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]


def check_vllm_prompt_logprobs(got: list, ids: list[int], want, k: int, tok) -> None:
    assert len(got) == len(ids) and got[0] is None
    for q in range(1, len(ids)):
        entry, ref = got[q], want.prompt_logprobs[q]
        assert str(ids[q]) in entry  # the prompt's token, whatever its rank
        mine = entry[str(ids[q])]
        assert set(mine) == {"logprob", "rank", "decoded_token"}
        assert mine["logprob"] == pytest.approx(ref.logprob, abs=1e-5) and mine["rank"] == ref.rank
        assert mine["decoded_token"] == tok.decode([ids[q]])
        tops = {str(t): v for t, v in ref.top[:k]}
        assert set(tops) <= set(entry) and len(entry) in (k, k + 1)
        for t, v in tops.items():
            assert entry[t]["logprob"] == pytest.approx(v, abs=1e-5)
        if str(ids[q]) not in tops:
            assert sorted(e["rank"] for t, e in entry.items() if t in tops) == list(range(1, k + 1))


def test_vllm_prompt_logprobs_on_completions_and_chat(server, engine, model):
    tok = engine.tokenizer
    ids = tok.encode(CONTEXT)
    body = {"model": model, "prompt": CONTEXT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3, "n": 2}
    status, _, got = http(server.url + "/v1/completions", "POST", body)
    assert status == 200, got
    want = direct(engine, ids, 3)
    for choice in got["choices"]:
        check_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, want, 3, tok)
        assert choice["logprobs"] is None
    messages = [{"role": "user", "content": "Name a color."}]
    chat_ids = engine.apply_chat_template(messages)
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    status, _, got = http(server.url + "/v1/chat/completions", "POST", body)
    assert status == 200, got
    check_vllm_prompt_logprobs(got["prompt_logprobs"], chat_ids, direct(engine, chat_ids, 0), 0, tok)
    # Not asked for: not there.
    body.pop("prompt_logprobs")
    _, _, got = http(server.url + "/v1/chat/completions", "POST", body)
    assert "prompt_logprobs" not in got


def test_sglang_return_logprob(server, engine):
    tok = engine.tokenizer
    ids = tok.encode(CONTEXT)
    want = direct(engine, ids, 2)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    status, _, got = http(server.url + "/generate", "POST", body)
    assert status == 200, got
    meta = got["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == ids[2:]
    for (value, token, text), ref in zip(inputs, want.prompt_logprobs[2:]):
        assert value == pytest.approx(ref.logprob, abs=1e-5) and text == tok.decode([token])
    assert len(meta["input_top_logprobs"]) == len(ids) - 2
    assert all(len(top) == 2 for top in meta["input_top_logprobs"])
    outputs = meta["output_token_logprobs"]
    assert [t for _, t, _ in outputs] == got["outputs"][0]["token_ids"] and len(outputs) == 3
    assert all(len(top) == 2 and top[0][1] == t for top, (_, t, _) in zip(meta["output_top_logprobs"], outputs))
    # From the first token: its logprob is null. Without text: nulls. Default start: outputs only.
    body.update(logprob_start_len=0, return_text_in_logprobs=False)
    _, _, got = http(server.url + "/generate", "POST", body)
    first = got["meta_info"]["input_token_logprobs"][0]
    assert first == [None, ids[0], None] and got["meta_info"]["input_top_logprobs"][0] is None
    body.pop("logprob_start_len")
    _, _, got = http(server.url + "/generate", "POST", body)
    assert got["meta_info"]["input_token_logprobs"] == [] and len(got["meta_info"]["output_token_logprobs"]) == 3
    assert got["cached_tokens"] > 0  # no prompt logprobs were asked for: the prompt came from the cache
    # Streamed: each event's meta_info holds its own tokens.
    body.update(stream=True, logprob_start_len=0)
    status, _, text = http(server.url + "/generate", "POST", body)
    assert status == 200
    events = [e for e in sse_events(text) if e != "[DONE]"]
    assert sum(len(e["meta_info"]["output_token_logprobs"]) for e in events) == 3
    assert sum(len(e["meta_info"]["input_token_logprobs"]) for e in events) == len(ids)


@pytest.mark.parametrize("changes, param", [
    ({"logprob_start_len": 0}, "logprob_start_len"),
    ({"return_logprob": True, "logprob_start_len": 10**6}, "logprob_start_len"),
    ({"return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
    ({"return_logprob": True, "top_logprobs_num": -2}, "top_logprobs_num"),
    ({"return_logprob": True, "sampling_params": {"logprobs": 2}}, "sampling_params.logprobs"),
    ({"return_logprob": "yes"}, "return_logprob"),
    ({"return_logprob": True, "token_ids_logprob": [1, 2]}, "token_ids_logprob"),
    ({"sampling_params": {"prompt_logprobs": 21}}, "sampling_params.prompt_logprobs"),
])
def test_sglang_refusals(server, changes, param):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 1}, **changes}
    status, _, got = http(server.url + "/generate", "POST", body)
    assert status == 400 and got["error"]["param"] == param, got


def test_native_prompt_logprobs(server, engine):
    ids = engine.tokenizer.encode(CONTEXT)
    body = {"input_ids": ids, "sampling_params": {"max_tokens": 0, "prompt_logprobs": 1}}
    status, _, got = http(server.url + "/generate", "POST", body)
    assert status == 200, got
    lps = got["prompt_logprobs"]
    want = direct(engine, ids, 1)
    assert lps[0] is None and [e["token_id"] for e in lps[1:]] == ids[1:]
    assert [e["rank"] for e in lps[1:]] == [e.rank for e in want.prompt_logprobs[1:]]
    assert all(len(e["top"]) == 1 for e in lps[1:])
    assert got["outputs"][0]["token_ids"] == [] and got["outputs"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_with_logprobs_equals_the_whole_answer(server, model, max_tokens):
    """Streamed, each choice opens with the prompt's text and logprobs (once they are computed), then
    its tokens; put together, a choice is what the answer not streamed holds."""
    body = {"model": model, "prompt": [CONTEXT, "Hello there"], "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 2, "echo": True, "n": 2, "ignore_eos": True}
    status, _, whole = http(server.url + "/v1/completions", "POST", body)
    assert status == 200, whole
    status, _, text = http(server.url + "/v1/completions", "POST", dict(body, stream=True))
    assert status == 200
    chunks = [c for c in sse_events(text) if c != "[DONE]"]
    got: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            mine = got.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
            mine["text"] += c["text"]
            mine["finish_reason"] = c["finish_reason"] or mine["finish_reason"]
            if c["logprobs"] is not None:
                if mine["logprobs"] is None:
                    mine["logprobs"] = {k: list(v) for k, v in c["logprobs"].items()}
                else:
                    for k, v in c["logprobs"].items():
                        mine["logprobs"][k] += v
    assert sorted(got) == [0, 1, 2, 3]
    for choice in whole["choices"]:
        streamed = got[choice["index"]]
        assert streamed["text"] == choice["text"] and streamed["finish_reason"] == choice["finish_reason"]
        assert streamed["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert streamed["logprobs"]["text_offset"] == choice["logprobs"]["text_offset"]
        assert streamed["logprobs"]["token_logprobs"][0] is None
        assert streamed["logprobs"]["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:],
                                                                           abs=1e-5)


def test_whole_vocabulary_with_max_logprobs_unlimited(make_engine, tiny_qwen3_path):
    """top_logprobs and prompt_logprobs -1 on a server whose engine has max_logprobs -1: every token of
    the vocabulary at each position (on the default engine they are a 400: see the robustness tests)."""
    from radixserve.server import BackgroundServer, ServerConfig

    engine = make_engine(tiny_qwen3_path, max_logprobs=-1)
    vocab = engine.core.runner.vocab_size
    with BackgroundServer(engine, ServerConfig(port=0)) as srv:
        name = srv.state.model_name
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
                "logprobs": True, "top_logprobs": -1, "prompt_logprobs": -1}
        status, _, got = http(srv.url + "/v1/chat/completions", "POST", body)
        assert status == 200, got
        content = got["choices"][0]["logprobs"]["content"]
        assert len(content) == 2 and all(len(c["top_logprobs"]) == vocab for c in content)
        prompt = got["prompt_logprobs"]
        assert prompt[0] is None and all(len(entry) == vocab for entry in prompt[1:])
        assert all(sorted(e["rank"] for e in entry.values()) == list(range(1, vocab + 1)) for entry in prompt[1:])
        status, _, got = http(srv.url + "/v1/completions", "POST", {"model": name, "prompt": [3, 4, 5],
                                                                    "max_tokens": 1, "logprobs": 21})
        assert status == 200, got  # no cap: more than OpenAI's 20
