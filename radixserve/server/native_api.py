"""The native /generate route: its request (any SamplingParams field) and its responses.

    {"text" | "input_ids", "sampling_params": {...}, "stream": bool}

`sampling_params` also takes SGLang's structured-output names (`json_schema`, `regex`,
`ebnf`) and `structured` as an object (server/structured.py).

The answer carries what the engine reports and OpenAI's shapes have no room
for: token ids, stop reasons, cached tokens, raw logprobs by token id, and
`folded_tokens` (prompt tokens computed by another sequence of the batch). Streamed, each
event is one engine delta (the shape `radixserve replay`'s HTTP target reads).
"""

from __future__ import annotations

from typing import Any

from radixserve.engine.outputs import StreamDelta, TokenLogprob
from radixserve.server import structured
from radixserve.server.openai_api import (
    SAMPLING_FIELDS,
    GenerateRequest,
    bad_request,
    check_known,
    check_object,
    check_token_ids,
    get_bool,
    get_int,
)
from radixserve.server.responses import ResponseBuilder


def parse_generate(body: Any) -> GenerateRequest:
    """POST /generate: {"text" | "input_ids", "sampling_params": {...SamplingParams}, "stream"}."""
    body = check_object(body)
    check_known(body, {"text", "input_ids", "sampling_params", "stream"})
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad_request("give exactly one of text and input_ids", param="text")
    prompt: str | list[int]
    if text is not None:
        if not isinstance(text, str) or not text:
            raise bad_request("text must be a non-empty string", param="text")
        prompt = text
    else:
        if not isinstance(ids, list):
            raise bad_request("input_ids must be a list of token ids", param="input_ids")
        prompt = check_token_ids(ids, "input_ids")
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise bad_request("sampling_params must be an object", param="sampling_params")
    known = {f"sampling_params.{k}" for k in (*SAMPLING_FIELDS, *structured.SGLANG_FIELDS, "max_new_tokens")}
    check_known({f"sampling_params.{k}": v for k, v in sp.items()}, known)
    constraints, constraint_names = structured.parse_sglang(sp)
    # SGLang's name for max_tokens; one of the two.
    if "max_new_tokens" in sp and "max_tokens" in sp:
        raise bad_request("give sampling_params.max_tokens or max_new_tokens, not both",
                          param="sampling_params.max_new_tokens")
    length = "max_new_tokens" if "max_new_tokens" in sp else "max_tokens"
    sampling = {k: (tuple(v) if isinstance(v, list) else v) for k, v in sp.items()
                if k not in ("max_tokens", length) and k not in structured.SGLANG_FIELDS}
    sampling.update(constraints)
    max_tokens = get_int(sp, length, 1)
    return GenerateRequest(
        route="generate",
        prompts=[prompt],
        messages=None,
        sampling=sampling,
        max_tokens=max_tokens,
        max_tokens_param=f"sampling_params.{length}",
        stream=get_bool(body, "stream"),
        logprobs=None,  # carried in sampling["logprobs"]
        names={**{k: f"sampling_params.{k}" for k in SAMPLING_FIELDS}, **constraint_names},
    )


def native_delta(delta: StreamDelta) -> dict[str, Any]:
    """One streamed delta of /generate, as the engine gave it."""
    body: dict[str, Any] = {
        "id": delta.request_id,
        "index": delta.index,
        "text": delta.text,
        "token_ids": list(delta.token_ids),
        "finish_reason": delta.finish_reason,
        "stop_reason": delta.stop_reason,
        "prompt_tokens": delta.prompt_tokens,
        "cached_tokens": delta.cached_tokens,
        "completion_tokens": delta.completion_tokens,
    }
    _add_folded(body, delta)
    if delta.logprobs is not None:
        body["logprobs"] = [_native_logprob(lp) for lp in delta.logprobs]
    return body


def native_response(builder: ResponseBuilder, request_id: str) -> dict[str, Any]:
    """The whole /generate result: the first completion's text up front, every completion in `outputs`."""
    outputs = [
        {
            "index": c.index,
            "text": c.text,
            "token_ids": c.token_ids,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "completion_tokens": len(c.token_ids),
            **({"logprobs": [_native_logprob(lp) for lp in c.logprobs]} if builder.logprobs else {}),
        }
        for c in builder.choices
    ]
    body: dict[str, Any] = {
        "id": request_id,
        "text": outputs[0]["text"],
        "outputs": outputs,
        "prompt_tokens": builder.usage.prompt_tokens,
        "cached_tokens": builder.usage.cached_tokens,
        "completion_tokens": builder.usage.completion_tokens,
    }
    body["folded_tokens"] = sum(c.folded_tokens for c in builder.choices)  # as RequestOutput's: summed
    return body


def _add_folded(body: dict[str, Any], delta: StreamDelta) -> None:
    body["folded_tokens"] = delta.folded_tokens


def _native_logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
