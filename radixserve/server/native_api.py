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

from collections.abc import Sequence
from typing import Any

from radixserve.engine.outputs import StreamDelta, TokenLogprob
from radixserve.server import structured
from radixserve.server.openai_api import (
    SAMPLING_FIELDS,
    ApiError,
    GenerateRequest,
    SGLangLogprobs,
    bad_request,
    check_known,
    check_object,
    check_token_ids,
    get_bool,
    get_int,
    get_logprobs_count,
    refuse_unless,
)
from radixserve.server.responses import ResponseBuilder, finite, first

# SGLang's logprob fields of /generate (beside sampling_params); token_ids_logprob and the rest are
# refused as unknown.
SGLANG_LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")

# SGLang's sampling_params names -> SamplingParams fields (no_stop_trim: keep the matched stop string).
SGLANG_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                "no_stop_trim": "include_stop_str_in_output", "sampling_seed": "seed"}


def parse_generate(body: Any) -> GenerateRequest:
    """POST /generate: {"text" | "input_ids", "sampling_params": {...SamplingParams}, "stream"}, and
    SGLang's return_logprob with its options."""
    body = check_object(body)
    check_known(body, {"text", "input_ids", "sampling_params", "stream", *SGLANG_LOGPROB_FIELDS})
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
    known = {f"sampling_params.{k}" for k in
             (*SAMPLING_FIELDS, *SGLANG_NAMES, *structured.SGLANG_FIELDS, "spaces_between_special_tokens")}
    check_known({f"sampling_params.{k}": v for k, v in sp.items()}, known)
    refuse_unless({f"sampling_params.{k}": v for k, v in sp.items()}, "sampling_params.spaces_between_special_tokens",
                  lambda v: v is True, "special tokens are decoded as the tokenizer joins them")
    constraints, constraint_names = structured.parse_sglang(sp)  # structured output and logit controls
    names = {k: f"sampling_params.{k}" for k in SAMPLING_FIELDS}
    for alias, name in SGLANG_NAMES.items():  # SGLang's names; one of the two
        if alias in sp and name in sp:
            raise bad_request(f"give sampling_params.{name} or {alias}, not both", param=f"sampling_params.{alias}")
        if alias in sp:
            names[name] = f"sampling_params.{alias}"
    names.update(constraint_names)
    length = names["max_tokens"]
    try:
        max_tokens = get_int(sp, length.removeprefix("sampling_params."), 0)
    except ApiError as exc:
        exc.param = length
        raise
    sp = {SGLANG_NAMES.get(k, k): v for k, v in sp.items()
          if k != "spaces_between_special_tokens" and k not in structured.SGLANG_FIELDS}
    sampling = {k: (tuple(v) if isinstance(v, list) else v) for k, v in sp.items() if k != "max_tokens"}
    sampling.update(constraints)
    if body.get("return_logprob"):  # these two come from its fields
        names.update(logprobs="top_logprobs_num", prompt_logprobs="top_logprobs_num")
    sglang = _sglang_logprobs(body, sampling)
    return GenerateRequest(
        route="generate",
        prompts=[prompt],
        messages=None,
        sampling=sampling,
        max_tokens=max_tokens,
        max_tokens_param=length,
        stream=get_bool(body, "stream"),
        logprobs=None,  # carried in sampling["logprobs"]
        names=names,
        sglang=sglang,
    )


def _sglang_logprobs(body: dict[str, Any], sampling: dict[str, Any]) -> SGLangLogprobs | None:
    """SGLang's return_logprob (output tokens' logprobs, and the prompt's from logprob_start_len on:
    -1, the default, reports output tokens only) with top_logprobs_num alternatives each. Sets the
    sampling fields that compute them; a client that also sets those there is refused."""
    if not get_bool(body, "return_logprob"):
        for name in SGLANG_LOGPROB_FIELDS[1:]:
            value = body.get(name)
            if value is not None and value is not False:  # set to something (0 included)
                raise bad_request(f"{name} needs return_logprob true", param=name)
        return None
    for name in ("logprobs", "prompt_logprobs"):
        if sampling.get(name) is not None:
            raise bad_request(f"give sampling_params.{name} or return_logprob, not both",
                              param=f"sampling_params.{name}")
    start = get_int(body, "logprob_start_len", -1)
    top = get_logprobs_count(body, "top_logprobs_num") or 0
    opts = SGLangLogprobs(start=-1 if start is None else start, top=top,
                          text=get_bool(body, "return_text_in_logprobs"))
    sampling["logprobs"] = top
    if opts.start >= 0:
        sampling["prompt_logprobs"] = top
    return opts


def native_delta(delta: StreamDelta, sglang: SGLangLogprobs | None, builder: ResponseBuilder) -> dict[str, Any]:
    """One streamed delta of /generate, as the engine gave it (with return_logprob, SGLang's
    meta_info: this delta's output tokens, and the prompt's on the delta that brings them)."""
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
    if delta.prompt_logprobs is not None:
        body["prompt_logprobs"] = [_native_prompt_logprob(lp) for lp in delta.prompt_logprobs]
    if sglang is not None:
        prompt_ids = builder.prompt_ids[0] if delta.prompt_logprobs is not None else []
        body["meta_info"] = _meta_info(sglang, builder, prompt_ids, delta.prompt_logprobs, delta.logprobs or ())
    return body


def native_response(builder: ResponseBuilder, request_id: str, sglang: SGLangLogprobs | None) -> dict[str, Any]:
    """The whole /generate result: the first completion's text up front, every completion in
    `outputs`; the prompt's logprobs where asked for, and SGLang's meta_info with return_logprob
    (its output logprobs those of the first completion)."""
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
    prompt_lps = builder.prompt_lps[0]
    if prompt_lps is not None:
        body["prompt_logprobs"] = [_native_prompt_logprob(lp) for lp in prompt_lps]
    if sglang is not None:
        ids = builder.prompt_ids[0] if builder.prompt_ids else []
        body["meta_info"] = _meta_info(sglang, builder, ids, prompt_lps, builder.choices[0].logprobs)
    return body


def _meta_info(
    opts: SGLangLogprobs, builder: ResponseBuilder, prompt_ids: list[int],
    prompt_lps: Sequence[TokenLogprob | None] | None, output: Sequence[TokenLogprob],
) -> dict[str, Any]:
    """SGLang's logprob fields: each position as [logprob, token_id, text or null] (the prompt's
    first token has a null logprob), the top alternatives as lists of those."""

    def text(token_id: int) -> str | None:
        return builder.token_text(token_id) if opts.text else None

    def top(lp: TokenLogprob | None) -> list[list[Any]] | None:
        return None if lp is None else [[finite(v), t, text(t)] for t, v in first(lp.top, opts.top)]

    start = max(opts.start, 0)
    inputs = list(zip(prompt_ids, prompt_lps or ()))[start:] if opts.start >= 0 else []
    return {
        "input_token_logprobs": [[None if lp is None else finite(lp.logprob), t, text(t)] for t, lp in inputs],
        "input_top_logprobs": [top(lp) for _, lp in inputs],
        "output_token_logprobs": [[finite(lp.logprob), lp.token_id, text(lp.token_id)] for lp in output],
        "output_top_logprobs": [top(lp) for lp in output],
    }


def _add_folded(body: dict[str, Any], delta: StreamDelta) -> None:
    body["folded_tokens"] = delta.folded_tokens


def _native_logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {"token_id": lp.token_id, "logprob": finite(lp.logprob), "top": [[t, finite(v)] for t, v in lp.top]}


def _native_prompt_logprob(lp: TokenLogprob | None) -> dict[str, Any] | None:
    return None if lp is None else dict(_native_logprob(lp), rank=lp.rank)
