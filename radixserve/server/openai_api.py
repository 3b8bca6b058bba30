"""OpenAI-compatible request parsing and validation (pure: no engine, no aiohttp).

Every parameter a route knows is either honoured or refused with a 400 naming
it; a parameter it does not know is refused too (as OpenAI does), so nothing
is silently ignored. Values that `SamplingParams` validates (ranges, types)
are left to it, and its `ValueError` becomes a 400 naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixserve.sampling_params import SamplingParams, widest
from radixserve.scheduler.request import POOLINGS
from radixserve.server import structured
from radixserve.server.errors import ApiError, bad_request, check_known
from radixserve.server.tools import ToolRequest, parse_tool_calls, parse_tool_request

MAX_N = 128  # OpenAI's limit on `n`
MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_BATCH = 256  # prompts (or embedding inputs) in one request

# Extensions beyond OpenAI, passed to SamplingParams under the same names.
EXTENSIONS = (
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
    "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
)
# vLLM's fields on chat and completions beyond its sampling parameters (see `_vllm_options`).
VLLM_FIELDS = (
    "truncate_prompt_tokens", "return_token_ids", "return_tokens_as_token_ids", "spaces_between_special_tokens",
    "length_penalty", "use_beam_search", "request_id", "priority",
)
# vLLM's prompt_logprobs (completions and chat): the answer's `prompt_logprobs`.
PROMPT_LOGPROBS = "prompt_logprobs"
# vLLM's chat template controls (chat and /tokenize): Engine.apply_chat_template's options.
CHAT_TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
# OpenAI names that map 1:1 to SamplingParams fields.
_DIRECT = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")


@dataclass
class GenerateRequest:
    """A parsed completions/chat/native request, before tokenization."""

    route: str  # "completions" | "chat" | "responses" | "generate"
    prompts: list[str | list[int]]  # completions/generate; chat uses `messages`
    messages: list[dict[str, Any]] | None
    sampling: dict[str, Any]  # SamplingParams kwargs, max_tokens excluded
    max_tokens: int | None  # None: the route's default
    max_tokens_param: str  # the name the client used, for error messages
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # top-N per token (0: the sampled token's only; -1: all); None: no logprobs
    prompt_logprobs: int | None = None  # vLLM's field: top-N per prompt token; None: not asked for
    sglang: SGLangLogprobs | None = None  # /generate's return_logprob and its options
    user: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # SamplingParams field -> the client's name
    chat_options: dict[str, Any] = field(default_factory=dict)  # Engine.apply_chat_template's options
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    # vLLM's: keep the last k prompt tokens (-1: as many as the context leaves room for); None: all.
    truncate_prompt_tokens: int | None = None
    return_token_ids: bool = False  # prompt_token_ids and token_ids in the answer
    tokens_as_ids: bool = False  # return_tokens_as_token_ids: logprob tokens as "token_id:N"
    request_id: str | None = None  # vLLM's: the response's id is the route's prefix + it
    tools: ToolRequest = field(default_factory=ToolRequest)  # chat's tools and tool_choice


@dataclass(frozen=True)
class SGLangLogprobs:
    """SGLang's /generate logprob options: `meta_info` gets input and output token logprobs."""

    start: int  # logprob_start_len: the first prompt position reported; -1: output tokens only
    top: int  # top_logprobs_num: alternatives per position
    text: bool  # return_text_in_logprobs: each entry's token text (else null)


@dataclass
class EmbeddingRequest:
    inputs: list[str | list[int]]
    encoding_format: str  # "float" | "base64"
    options: dict[str, Any]  # pooling, normalize (extensions)


# -- shared checks ------------------------------------------------------------------------

# A \uD800-\uDFFF escape in JSON text that is not half of a pair. It is only a fast filter (an escaped
# backslash before "ud800" matches too): `check_unicode` walks the parsed body for the truth.
_LONE_SURROGATE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _is_unicode(text: str) -> bool:
    """Whether `text` can be encoded (UTF-8, a tokenizer): no lone UTF-16 surrogate in it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(body: Any, json_text: str) -> None:
    """Refuse a parsed JSON body if any string in it (a value or a key) holds a lone UTF-16 surrogate.

    JSON may spell one (`"\\ud800"`); no tokenizer encodes it. One check for every route and
    field (prompts, chat content and its parts, stop strings, /generate text, embedding inputs, names),
    answered with a 400 whose `param` is the field's path, e.g. `messages[0].content[1].text`.
    `json_text` (the body the value was parsed from) lets the common case skip the walk.
    """
    if not _LONE_SURROGATE_ESCAPE.search(json_text):
        return
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:  # iterative: json.loads accepts nesting deeper than Python's recursion limit
        value, where = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                raise bad_request(f"{where or 'the request body'} holds a lone UTF-16 surrogate, which is not "
                                  "valid Unicode text", param=where or None, code="invalid_unicode")
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                if not _is_unicode(key):
                    raise bad_request(f"a parameter name in {where or 'the request body'} ({ascii(key)}) holds a "
                                      "lone UTF-16 surrogate", param=where or None, code="invalid_unicode")
                items.append((item, f"{where}.{key}" if where else key))
            stack.extend(reversed(items))  # fields in document order: the first bad one is named
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{j}]") for j, item in reversed(list(enumerate(value)))
                         if isinstance(item, (str, dict, list)))


def check_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise bad_request(f"model must be a string, got {type(model).__name__}", param="model")
    if model != served:
        raise bad_request(
            f"The model `{model}` does not exist; this server serves `{served}`", param="model", code="model_not_found"
        )


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def get_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad_request(f"{name} must be an integer {allowed}, got {value!r}", param=name)
    return value


def refuse_unless(body: dict[str, Any], name: str, ok: Callable[[Any], bool], why: str) -> None:
    """Accept `name` only with a value that asks for nothing this server lacks."""
    value = body.get(name)
    if value is not None and not ok(value):
        raise bad_request(f"{name}={value!r} is not supported: {why}", param=name, code="unsupported_value")


def check_token_ids(ids: list[Any], param: str) -> list[int]:
    if not ids:
        raise bad_request(f"{param} is empty", param=param)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request(f"{param} must be a string or a list of integer token ids", param=param)
    return ids


def parse_prompts(value: Any, param: str) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts (OpenAI's four forms)."""
    if value is None:
        raise bad_request(f"you must provide {param}", param=param, code="missing_required_parameter")
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value:
        prompts = value
    else:
        raise bad_request(
            f"{param} must be a non-empty string, list of strings, list of token ids, or list of token-id lists",
            param=param,
        )
    if len(prompts) > MAX_BATCH:
        raise bad_request(f"{param} holds {len(prompts)} prompts; the limit is {MAX_BATCH}", param=param)
    out: list[str | list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise bad_request(f"{param} must not be an empty string", param=param)
            out.append(p)
        elif isinstance(p, list):
            out.append(check_token_ids(p, param))
        else:
            raise bad_request(
                f"{param} items must be strings or lists of token ids, got {type(p).__name__}", param=param
            )
    return out


# -- sampling parameters --------------------------------------------------------------------


def _stop(body: dict[str, Any]) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop holds {len(stops)} sequences; the limit is {MAX_STOP}", param="stop")
    return tuple(stops)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI + extension fields -> SamplingParams kwargs (values checked there)."""
    kw: dict[str, Any] = {k: body[k] for k in _DIRECT + EXTENSIONS if body.get(k) is not None}
    temperature = kw.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be in [0, 2], got {temperature!r}", param="temperature")
    if "stop_token_ids" in kw and not isinstance(kw["stop_token_ids"], list):
        raise bad_request("stop_token_ids must be a list of token ids", param="stop_token_ids")
    stop = _stop(body)
    if stop is not None:
        kw["stop"] = stop
    n = get_int(body, "n", 1, MAX_N)
    if n is not None:
        kw["n"] = n
    return kw


def get_logprobs_count(body: dict[str, Any], name: str) -> int | None:
    """A top-N count: an int >= -1 (-1: the whole vocabulary); the engine's max_logprobs caps it."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise bad_request(f"{name} must be -1 (the whole vocabulary) or an integer >= 0, got {value!r}", param=name)
    return value


def _prompt_logprobs(body: dict[str, Any], stream: bool) -> int | None:
    """vLLM's prompt_logprobs; as in vLLM, not with stream (the answer carries them whole)."""
    value = get_logprobs_count(body, PROMPT_LOGPROBS)
    if value is not None and stream:
        raise bad_request("prompt_logprobs are not available when stream is true", param=PROMPT_LOGPROBS,
                          code="unsupported_value")
    return value


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats). vLLM's continuous_usage_stats puts the usage so far on
    every chunk; it implies include_usage unless that is false (then it is a 400)."""
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(opts, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    check_known({f"stream_options.{k}": v for k, v in opts.items()},
                {"stream_options.include_usage", "stream_options.continuous_usage_stats"})
    try:
        continuous = get_bool(opts, "continuous_usage_stats")
        include = get_bool(opts, "include_usage", default=continuous)
    except ApiError as exc:
        exc.param = f"stream_options.{exc.param}"
        raise
    if continuous and not include:
        raise bad_request("stream_options.continuous_usage_stats needs include_usage",
                          param="stream_options.continuous_usage_stats")
    return include, continuous


def _vllm_options(body: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    """vLLM's truncate_prompt_tokens, return_token_ids, return_tokens_as_token_ids; the beam search
    and detokenizer fields only with the values this server implements."""
    truncate = body.get("truncate_prompt_tokens")
    if truncate is not None and (not isinstance(truncate, int) or isinstance(truncate, bool)
                                 or not (truncate == -1 or truncate >= 1)):
        raise bad_request(f"truncate_prompt_tokens must be -1 (as many as fit) or an integer >= 1, got "
                          f"{truncate!r}", param="truncate_prompt_tokens")
    as_ids = get_bool(body, "return_tokens_as_token_ids")
    if as_ids and not logprobs:
        raise bad_request("return_tokens_as_token_ids shows logprob tokens as ids: ask for logprobs too",
                          param="return_tokens_as_token_ids")
    refuse_unless(body, "use_beam_search", lambda v: v is False, "beam search is not implemented")
    refuse_unless(body, "length_penalty", lambda v: v == 1 and not isinstance(v, bool),
                  "length_penalty applies to beam search, which is not implemented")
    refuse_unless(body, "spaces_between_special_tokens", lambda v: v is True,
                  "special tokens are decoded as the tokenizer joins them")
    refuse_unless(body, "priority", lambda v: v == 0 and not isinstance(v, bool),
                  "requests have no priorities (the engine's schedule policy orders them)")
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not 1 <= len(request_id) <= 256
                                   or not request_id.isprintable()):
        raise bad_request("request_id must be a printable string of 1 to 256 characters", param="request_id")
    return {"truncate_prompt_tokens": truncate, "return_token_ids": get_bool(body, "return_token_ids"),
            "tokens_as_ids": as_ids, "request_id": request_id}


_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "user", "seed", PROMPT_LOGPROBS, *EXTENSIONS, *VLLM_FIELDS, *structured.OPENAI_FIELDS,
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "store", "echo", *CHAT_TEMPLATE_FIELDS,
}


def _common(body: dict[str, Any], served: str, fields: set[str], logprobs: bool) -> dict[str, Any]:
    """What completions and chat share, as GenerateRequest fields."""
    check_known(body, fields)
    check_model(body, served)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", param="user")
    stream = get_bool(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    constraints, names = structured.parse_openai(body)  # structured output and logit controls
    return dict(sampling={**_sampling(body), **constraints}, stream=stream, include_usage=include_usage,
                continuous_usage=continuous, user=user, names=names, **_vllm_options(body, logprobs))


def parse_completion(body: Any, served: str) -> GenerateRequest:
    """POST /v1/completions."""
    body = check_object(body)
    common = _common(body, served, COMPLETION_FIELDS, logprobs=body.get("logprobs") is not None)
    refuse_unless(body, "suffix", lambda v: v == "", "insertion (suffix) is not implemented")
    n = common["sampling"].get("n", 1)
    refuse_unless(body, "best_of", lambda v: v == n, "best_of must equal n (no server-side ranking)")
    logprobs = get_logprobs_count(body, "logprobs")
    echo = get_bool(body, "echo")
    return GenerateRequest(
        route="completions",
        prompts=parse_prompts(body.get("prompt"), "prompt"),
        messages=None,
        max_tokens=get_int(body, "max_tokens", 0),
        max_tokens_param="max_tokens",
        echo=echo,
        logprobs=logprobs,
        prompt_logprobs=_prompt_logprobs(body, common["stream"]),
        **common,
    )


def parse_chat(body: Any, served: str) -> GenerateRequest:
    """POST /v1/chat/completions."""
    body = check_object(body)
    common = _common(body, served, CHAT_FIELDS, logprobs=body.get("logprobs") is True)
    # A forced tool call's schema is the structured constraint when no other is given.
    common["names"] = {"logprobs": "top_logprobs", "structured": "tool_choice", **common["names"]}
    refuse_unless(body, "store", lambda v: v is False, "stored completions are not implemented")
    max_tokens = get_int(body, "max_tokens", 0)
    max_completion = get_int(body, "max_completion_tokens", 0)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad_request("give max_completion_tokens or max_tokens, not both", param="max_tokens")
    logprobs = get_bool(body, "logprobs")
    top = get_logprobs_count(body, "top_logprobs")
    if top is not None and not logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    return GenerateRequest(
        route="chat",
        prompts=[],
        messages=parse_messages(body.get("messages")),
        max_tokens=max_completion if max_completion is not None else max_tokens,
        max_tokens_param="max_completion_tokens" if max_completion is not None else "max_tokens",
        echo=get_bool(body, "echo"),
        logprobs=(top or 0) if logprobs else None,
        prompt_logprobs=_prompt_logprobs(body, common["stream"]),
        chat_options=parse_chat_options(body),
        tools=parse_tool_request(body),
        **common,
    )


def chat_template_error(exc: ValueError) -> ApiError:
    """A 400 for messages or chat options the template refused; the param is the option its message
    names first, else messages."""
    first = str(exc).split(" ", 1)[0]
    return bad_request(str(exc), param=first if first in CHAT_TEMPLATE_FIELDS else "messages")


def parse_chat_options(body: dict[str, Any]) -> dict[str, Any]:
    """add_generation_prompt (default true), continue_final_message, chat_template_kwargs."""
    options: dict[str, Any] = {
        "add_generation_prompt": get_bool(body, "add_generation_prompt", default=True),
        "continue_final_message": get_bool(body, "continue_final_message"),
    }
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad_request("chat_template_kwargs must be an object", param="chat_template_kwargs")
        options["chat_template_kwargs"] = kwargs
    return options


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_KEYS = {"role", "content", "name"}
_ROLE_KEYS = {"assistant": _KEYS | {"tool_calls", "reasoning_content"}, "tool": _KEYS | {"tool_call_id"}}
# What the OpenAI client sends back when a reply's message object is appended to the history as is.
_NULL_KEYS = {"refusal", "audio", "function_call", "annotations"}


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages for the chat template: text content (parts of type "text" are joined with newlines),
    an optional name; assistant messages may hold tool_calls (content may then be null) and
    reasoning_content; a tool message answers a call by its tool_call_id."""
    if messages is None:
        raise bad_request("you must provide messages", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    if len(messages) > 4096:
        raise bad_request("too many messages (the limit is 4096)", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object", param=where)
    role = m.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role")
    keys = _ROLE_KEYS.get(role, _KEYS)
    check_known({f"{where}.{k}": v for k, v in m.items() if not (k in _NULL_KEYS and v is None)},
                {f"{where}.{k}" for k in keys})
    message: dict[str, Any] = {"role": _ROLES[role]}
    if m.get("tool_calls"):
        message["tool_calls"] = parse_tool_calls(m["tool_calls"], f"{where}.tool_calls")
    content = m.get("content")
    # A reply that only called tools has no text (the template is given "").
    message["content"] = "" if content is None and "tool_calls" in message else _content(content, f"{where}.content")
    for key in ("name", "tool_call_id", "reasoning_content"):
        if m.get(key) is not None or (key == "name" and key in m):
            if not isinstance(m[key], str):
                raise bad_request(f"{where}.{key} must be a string", param=f"{where}.{key}")
            message[key] = m[key]
    if role == "tool" and "tool_call_id" not in message:
        raise bad_request(f"{where}.tool_call_id is required in a tool message", param=f"{where}.tool_call_id",
                          code="missing_required_parameter")
    return message


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                                  "other content types are not supported", param=f"{where}[{j}]")
            if set(part) - {"type", "text"}:
                raise bad_request(f"{where}[{j}] has unsupported keys {sorted(set(part) - {'type', 'text'})}",
                                  param=f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where} must be a string or a non-empty array of text parts", param=where)


SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


def build_sampling_params(
    req: GenerateRequest,
    prompt_lens: list[int],
    max_context: int,
    default_max_tokens: int | None,
    extra: dict[str, Any] | None = None,
) -> SamplingParams:
    """SamplingParams for `req`; a prompt plus max_tokens must fit the context (400 otherwise).

    `default_max_tokens` None means "the rest of the context" (chat's default). `extra`: more
    fields (a forced tool choice's structured output).
    """
    longest = max(prompt_lens)
    room = max_context - longest
    max_tokens = req.max_tokens if req.max_tokens is not None else (default_max_tokens or room)
    if req.max_tokens is None:
        max_tokens = min(max_tokens, room)
    if longest + max_tokens > max_context:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or {req.max_tokens_param}.",
            param=req.max_tokens_param,
            code="context_length_exceeded",
        )
    both = sorted(set(req.sampling) & set(extra or {}))
    if both:  # e.g. response_format and a forced tool call: each would constrain the reply
        raise bad_request(f"tool_choice forces the reply's form, which {', '.join(req.names.get(k, k) for k in both)} "
                          "also sets: give one of them", param="tool_choice")
    kw = dict(req.sampling, max_tokens=max_tokens, **(extra or {}))
    if req.logprobs is not None:
        kw["logprobs"] = req.logprobs
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens come with their logprobs
        prompt_logprobs = widest(prompt_logprobs, req.logprobs)
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as exc:
        raise sampling_error(req, exc) from None


def sampling_error(req: GenerateRequest, exc: Exception) -> ApiError:
    """A 400 for a sampling parameter the engine refused; its message starts with the field's name
    (`structured.json ...`: the field is `structured`)."""
    field_name = str(exc).split(" ", 1)[0].split(".", 1)[0]
    param = req.names.get(field_name, field_name if field_name in SAMPLING_FIELDS else None)
    if field_name == "max_tokens":
        param = req.max_tokens_param
    message = str(exc)
    if field_name == "structured" and param not in (None, "structured"):  # the client's name for it first
        message = f"{param}: {message}"
    return bad_request(message, param=param)


# -- embeddings ------------------------------------------------------------------------------

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "pooling", "normalize"}


def parse_embedding(body: Any, served: str) -> EmbeddingRequest:
    """POST /v1/embeddings (extensions: pooling, normalize)."""
    body = check_object(body)
    check_known(body, EMBEDDING_FIELDS)
    check_model(body, served)
    refuse_unless(body, "dimensions", lambda v: False, "truncating embeddings is not implemented")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    pooling = body.get("pooling") or "last"
    if pooling not in POOLINGS:
        raise bad_request(f"pooling must be one of {POOLINGS}, got {pooling!r}", param="pooling")
    return EmbeddingRequest(
        inputs=parse_prompts(body.get("input"), "input"),
        encoding_format=fmt,
        options={"pooling": pooling, "normalize": get_bool(body, "normalize", default=True)},
    )
