"""The official `openai` client, sync (`OpenAI`) and async (`AsyncOpenAI`), streaming and not,
against real servers: a JSON schema's output validates (`jsonschema`) in every fold mode with the
prefix cache on and off; a grammar-forced tool call round trip through a Qwen3-style chat template
on a tiny random Qwen3; prompt logprobs equal transformers' on SmolLM2, cold and from a cached
prefix; a logit_bias of -100 bans a token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from helpers.leaks import assert_no_leak
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)
from helpers.tool_templates import TOOLS_CHAT_TEMPLATE

from radixserve import SamplingParams
from radixserve.server import BackgroundServer, ServerConfig

API = ["sync", "async"]
STREAM = [pytest.param(False, id="whole"), pytest.param(True, id="stream")]

# Short and bounded (at most ~25 tokens), so a small max_tokens always lets it close.
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                   "rank": {"type": "integer", "minimum": 1, "maximum": 9},
                   "capital": {"type": "boolean"}},
    "required": ["city", "rank", "capital"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
CITY = [{"role": "user", "content": "Name a city, its rank by size in its country, and whether it is the capital, "
                                    "as JSON."}]


def sync_client(srv: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(srv: BackgroundServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def _chat_async(srv: BackgroundServer, stream: bool, requests: list[dict]) -> list[dict]:
    """The requests at once (concurrently, so those sharing a prompt meet in one batch), each read
    into {"content", "finish_reason", "tool_calls", "extra"} whether streamed or not."""
    client = async_client(srv)

    async def one(kwargs: dict) -> dict:
        if not stream:
            return _read(await client.chat.completions.create(**kwargs))
        chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
        return _read_chunks(chunks)

    try:
        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await client.close()


def chat(srv: BackgroundServer, api: str, stream: bool, requests: list[dict]) -> list[dict]:
    """Chat requests through the sync or the async client, streamed or not (see _chat_async)."""
    if api == "async":
        return asyncio.run(_chat_async(srv, stream, requests))
    client = sync_client(srv)
    if not stream:
        return [_read(client.chat.completions.create(**r)) for r in requests]
    return [_read_chunks(list(client.chat.completions.create(**r, stream=True))) for r in requests]


def _read(resp: Any) -> dict:
    (choice,) = resp.choices
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for c in choice.message.tool_calls or []]
    return {"content": choice.message.content, "finish_reason": choice.finish_reason, "tool_calls": calls,
            "message": choice.message, "extra": resp.model_extra or {}}


def _read_chunks(chunks: list[Any]) -> dict:
    """A streamed reply put together the way a client does: content concatenated, each call's
    id and name from its first delta and its arguments from all of them."""
    content, finish, calls, extra = "", None, {}, {}
    for chunk in chunks:
        extra.update(chunk.model_extra or {})
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or tc.id
            call["name"] = call["name"] or (tc.function.name if tc.function else None)
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "finish_reason": finish, "tool_calls": [calls[i] for i in sorted(calls)],
            "message": None, "extra": extra}


# -- JSON schema in every fold and cache mode -------------------------------------------------

MODES = [
    pytest.param({"fold_mode": "tree", "enable_prefix_cache": True}, id="tree-cache"),
    pytest.param({"fold_mode": "mlp", "enable_prefix_cache": True}, id="mlp-cache"),
    pytest.param({"fold_mode": "off", "enable_prefix_cache": True}, id="off-cache"),
    pytest.param({"fold_mode": "tree", "enable_prefix_cache": False}, id="tree-nocache"),
    pytest.param({"fold_mode": "mlp", "enable_prefix_cache": False}, id="mlp-nocache"),
    pytest.param({"fold_mode": "off", "enable_prefix_cache": False}, id="off-nocache"),
]


@pytest.fixture(scope="module", params=MODES)
def mode_server(request, smollm_path) -> Iterator[tuple[Any, BackgroundServer]]:
    """A SmolLM2 engine in one fold and cache mode (folding whenever a batch shares any prefix),
    served; one at a time, since the tests are grouped by mode."""
    from radixserve import Engine

    eng = Engine(str(smollm_path), device="cpu", check_invariants=True, max_running_requests=8, fold_threshold=1.0,
                 show_progress=False, **request.param)
    try:
        with BackgroundServer(eng, ServerConfig(port=0)) as srv:
            yield eng, srv
        assert_no_leak(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("api", API)
def test_json_schema_output_validates(mode_server, api, stream):
    """Three requests with one prompt, greedy and sampled (concurrent on the async client, so they
    can share a batch and fold, or find the first one's prefix cached); each reply closes the
    object and validates against the schema."""
    eng, srv = mode_server
    model = srv.state.model_name
    requests = [{"model": model, "messages": CITY, "max_tokens": 48, "response_format": RESPONSE_FORMAT,
                 "temperature": t, "seed": s} for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    replies = chat(srv, api, stream, requests)
    for reply in replies:
        assert reply["finish_reason"] == "stop", reply
        jsonschema.validate(json.loads(reply["content"]), SCHEMA)
    assert_no_leak(eng)


# -- tool calls forced by the grammar, on a tiny random Qwen3 ---------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = {t["function"]["name"]: t for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen3_tools_path(tmp_path_factory, smollm_path) -> Path:
    """A tiny random Qwen3 over SmolLM2's tokenizer (its vocabulary, ChatML specials), whose chat
    template is a Qwen3-style one with tools (helpers/tool_templates.py)."""
    from helpers.tiny_models import make_tiny_qwen3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm_path))
    path = make_tiny_qwen3(tmp_path_factory.mktemp("qwen3-tools"), vocab_size=len(tok), with_tokenizer=False,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                           max_position_embeddings=2048)
    tok.chat_template = TOOLS_CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tools_server(qwen3_tools_path) -> Iterator[tuple[Any, BackgroundServer]]:
    from radixserve import Engine

    eng = Engine(str(qwen3_tools_path), device="cpu", check_invariants=True, max_running_requests=8,
                 show_progress=False)
    try:
        with BackgroundServer(eng, ServerConfig(port=0)) as srv:
            yield eng, srv
        assert_no_leak(eng)
    finally:
        eng.shutdown()


def _check_call(call: dict, names: set[str]) -> dict:
    assert call["name"] in names and call["id"], call
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, TOOLS[call["name"]]["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("api", API)
def test_forced_tool_call_round_trip(tools_server, api, stream):
    """tool_choice "required" and a named function (sampled from a random model: only the grammar
    makes these calls) give calls that parse and validate; the assistant's call and the tool's
    result go back as the client sends them, and the next request's prompt holds both."""
    eng, srv = tools_server
    model = srv.state.model_name
    named = {"type": "function", "function": {"name": "get_weather"}}
    base = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 64, "temperature": 1.0,
            "parallel_tool_calls": False}
    required, forced = chat(srv, api, stream, [dict(base, tool_choice="required", seed=3),
                                               dict(base, tool_choice=named, seed=4)])
    for reply, names in ((required, set(TOOLS)), (forced, {"get_weather"})):
        assert reply["finish_reason"] == "tool_calls" and not reply["content"], reply
        (call,) = reply["tool_calls"]
        _check_call(call, names)

    (call,) = forced["tool_calls"]
    result = "22 degrees and sunny"
    assistant = (forced["message"] if forced["message"] is not None else
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": call["id"], "type": "function",
                      "function": {"name": call["name"], "arguments": call["arguments"]}}]})
    history = [*ASK, assistant, {"role": "tool", "tool_call_id": call["id"], "content": result}]
    (after,) = chat(srv, api, stream, [{"model": model, "messages": history, "tools": [WEATHER, TIME],
                                        "max_tokens": 4, "temperature": 0, "extra_body": {"return_token_ids": True}}])
    assert after["finish_reason"] in ("stop", "length", "tool_calls"), after
    prompt = eng.tokenizer.decode(after["extra"]["prompt_token_ids"])
    assert f"<tool_response>\n{result}\n</tool_response>" in prompt
    assert json.dumps({"name": "get_weather", "arguments": json.loads(call["arguments"])}) in prompt
    dumped = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in history]
    status, _, tokens = http(srv.url + "/tokenize", "POST", {"model": model, "messages": dumped,
                                                              "tools": [WEATHER, TIME]})
    assert status == 200 and tokens["tokens"] == after["extra"]["prompt_token_ids"], tokens
    assert_no_leak(eng)


# -- logit_bias -100 ---------------------------------------------------------------------------

PROMPT = "The capital of France is"


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("api", API)
def test_logit_bias_minus_100_bans_tokens(server, engine, api, stream):
    """Greedy, the banned tokens (the free greedy reply's) never come, on completions and chat."""
    model = server.state.model_name
    free = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           progress=False)[0].token_ids
    bias = {str(t): -100 for t in free}

    async def run_async() -> tuple[list[int], list[int]]:
        client = async_client(server)
        try:
            return (await _completion_ids(client, model, bias, stream),
                    await _chat_ids(client, model, bias, stream))
        finally:
            await client.close()

    if api == "async":
        completion, reply = asyncio.run(run_async())
    else:
        client = sync_client(server)
        completion = _completion_ids_sync(client, model, bias, stream)
        reply = _chat_ids_sync(client, model, bias, stream)
    assert len(completion) == 6 and not set(completion) & set(free), (completion, free)
    assert reply and not set(reply) & set(free), (reply, free)


def _completion_kwargs(model: str, bias: dict, stream: bool) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logit_bias": bias,
            "stream": stream, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


def _chat_kwargs(model: str, bias: dict, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0,
            "logit_bias": bias, "stream": stream, "extra_body": {"return_token_ids": True}}


def _ids(choices: list[Any]) -> list[int]:
    return [t for c in choices for t in (c.model_extra or {}).get("token_ids") or []]


def _completion_ids_sync(client: openai.OpenAI, model: str, bias: dict, stream: bool) -> list[int]:
    got = client.completions.create(**_completion_kwargs(model, bias, stream))
    return _ids([c for chunk in got for c in chunk.choices] if stream else got.choices)


def _chat_ids_sync(client: openai.OpenAI, model: str, bias: dict, stream: bool) -> list[int]:
    got = client.chat.completions.create(**_chat_kwargs(model, bias, stream))
    return _ids([c for chunk in got for c in chunk.choices] if stream else got.choices)


async def _completion_ids(client: openai.AsyncOpenAI, model: str, bias: dict, stream: bool) -> list[int]:
    got = await client.completions.create(**_completion_kwargs(model, bias, stream))
    return _ids([c async for chunk in got for c in chunk.choices] if stream else got.choices)


async def _chat_ids(client: openai.AsyncOpenAI, model: str, bias: dict, stream: bool) -> list[int]:
    got = await client.chat.completions.create(**_chat_kwargs(model, bias, stream))
    return _ids([c async for chunk in got for c in chunk.choices] if stream else got.choices)


# -- prompt logprobs against transformers -----------------------------------------------------

COLD = "The capital of France is Paris, and the capital of Italy is"
SHARED = "The capital of France is Paris, and the largest city of Spain is"


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm_path), dtype=torch.float32).eval()


def hf_logprobs(model, ids: list[int]) -> list[float]:
    """transformers' log-probability of each prompt token after the first (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    rows = torch.log_softmax(logits, dim=-1)[:-1]
    return [rows[q, ids[q + 1]].item() for q in range(len(ids) - 1)]


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("api", API)
def test_prompt_logprobs_equal_transformers_cold_and_cached(server, engine, hf_smollm, api, stream):
    """Scored with echo and max_tokens 0: cold, again with the prompt cached, and a prompt sharing
    the cached prefix; and vLLM's prompt_logprobs field on the last one (not streamed)."""
    model = server.state.model_name
    tok = engine.tokenizer

    def ask(prompt: str, extra: dict | None = None) -> dict:
        kwargs = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                  "stream": stream, "extra_body": extra or {}}
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        if api == "async":
            return asyncio.run(_score_async(server, kwargs))
        return _score(sync_client(server).completions.create(**kwargs), stream)

    def cached(prompt: str) -> int:
        """The cached tokens a plain request (no logprobs) takes from the tree for `prompt`."""
        usage = sync_client(server).completions.create(model=model, prompt=prompt, max_tokens=1).usage
        return (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0

    # Cold; then the same prompt and one sharing its prefix while the tree holds them. A scoring
    # request computes the logits of every prompt token, so it takes nothing from the tree itself.
    for prompt in (COLD, COLD, SHARED):
        ids = tok.encode(prompt)
        got = ask(prompt)
        assert got["text"] == prompt and got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(hf_logprobs(hf_smollm, ids), abs=1e-4)
        assert got["usage"].prompt_tokens == len(ids)
        details = got["usage"].prompt_tokens_details
        assert details is None or not details.cached_tokens, got["usage"]
        assert cached(prompt) > len(ids) // 2  # the tree held (at least) the shared prefix
    if stream:  # vLLM's prompt_logprobs field comes on a whole response only (a stream is a 400, as in vLLM)
        return
    vllm = ask(SHARED, {"prompt_logprobs": 0})["extra"]["prompt_logprobs"]
    ids = tok.encode(SHARED)
    assert vllm[0] is None
    assert [vllm[q][str(ids[q])]["logprob"] for q in range(1, len(ids))] == pytest.approx(
        hf_logprobs(hf_smollm, ids), abs=1e-4)


def _score(got: Any, stream: bool) -> dict:
    if not stream:
        (choice,) = got.choices
        return {"text": choice.text, "token_logprobs": choice.logprobs.token_logprobs, "usage": got.usage,
                "extra": choice.model_extra or {}}
    return _score_chunks(list(got))


def _score_chunks(chunks: list[Any]) -> dict:
    text, lps, usage, extra = "", [], None, {}
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.text
            lps += choice.logprobs.token_logprobs if choice.logprobs else []
            extra.update(choice.model_extra or {})
    return {"text": text, "token_logprobs": lps, "usage": usage, "extra": extra}


async def _score_async(srv: BackgroundServer, kwargs: dict) -> dict:
    client = async_client(srv)
    try:
        got = await client.completions.create(**kwargs)
        if not kwargs["stream"]:
            return _score(got, False)
        return _score_chunks([c async for c in got])
    finally:
        await client.close()
