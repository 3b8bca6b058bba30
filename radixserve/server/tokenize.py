"""vLLM's tokenizer routes and /version: what a client needs to count and build prompts.

    POST /tokenize    {"prompt": str | "messages": [...] (and "tools"), "add_special_tokens",
                       "add_generation_prompt", "return_token_strs", "model"}
                      -> {"count", "max_model_len", "tokens", "token_strs" (when asked)}
    POST /detokenize  {"tokens": [int], "model"} -> {"prompt": str}
    GET  /version     {"version": radixserve's}

`model` is optional here (as in vLLM); when given it must be the served one. Token ids
must lie inside the vocabulary; text goes through the same checks as every route.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
from typing import Any

from aiohttp import web

from radixserve.server.openai_api import (
    CHAT_TEMPLATE_FIELDS,
    bad_request,
    chat_template_error,
    check_known,
    check_model,
    check_object,
    get_bool,
    parse_chat_options,
    parse_messages,
)
from radixserve.server.routes import check_prompts, json_response, read_json
from radixserve.server.state import ServerState, state_of
from radixserve.server.tools import check_template_shows, parse_tools, template_text

_TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "return_token_strs", "tools",
                    *CHAT_TEMPLATE_FIELDS}


def _tokenizer(state: ServerState) -> Any:
    tok = state.engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer", code="no_tokenizer")
    return tok


def _check_optional_model(body: dict[str, Any], state: ServerState) -> None:
    if body.get("model") is not None:
        check_model(body, state.model_name)


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    body = check_object(await read_json(request))
    check_known(body, _TOKENIZE_FIELDS)
    _check_optional_model(body, state)
    tok = _tokenizer(state)
    if ("prompt" in body) == ("messages" in body):
        raise bad_request("give exactly one of prompt and messages", param="prompt")
    strs = get_bool(body, "return_token_strs")
    if "messages" in body:
        if "add_special_tokens" in body:
            raise bad_request("add_special_tokens applies to a prompt; messages go through the chat template",
                              param="add_special_tokens")
        messages = parse_messages(body["messages"])
        options = parse_chat_options(body)
        tools = parse_tools(body.get("tools"))
        check_template_shows(tools, template_text(tok))
        try:
            ids = await asyncio.to_thread(functools.partial(state.engine.apply_chat_template, messages,
                                                            tools=tools or None, **options))
        except ValueError as exc:
            raise chat_template_error(exc) from None
    else:
        for name in (*CHAT_TEMPLATE_FIELDS, "tools"):
            if name in body:
                raise bad_request(f"{name} applies to messages", param=name)
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise bad_request(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
        special = get_bool(body, "add_special_tokens", default=True)
        ids = await asyncio.to_thread(tok.encode, prompt, add_special_tokens=special)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": state.context_limit, "tokens": list(ids)}
    if strs:
        answer["token_strs"] = tok.convert_ids_to_tokens(list(ids))
    return json_response(answer)


async def detokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    body = check_object(await read_json(request))
    check_known(body, {"model", "tokens"})
    _check_optional_model(body, state)
    tok = _tokenizer(state)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request("tokens must be a list of integer token ids", param="tokens")
    if ids:
        check_prompts(state, [ids], "tokens")  # inside the vocabulary (and the context)
    return json_response({"prompt": await asyncio.to_thread(tok.decode, ids)})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": importlib.metadata.version("radixserve")})


ROUTES = (
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/version", version),
)
