"""Request fields for structured output and the logit controls, as OpenAI, vLLM and SGLang spell them.

Each route's fields become SamplingParams kwargs (`structured`, `logit_bias`,
`allowed_token_ids`, `bad_words`) plus the client's name for each, so that a value the
engine refuses (a schema that does not compile, an id past the vocabulary) is a 400
whose `param` is the field the client sent. At most one structured constraint per
request: two (say `response_format` and `guided_json`) are a 400.

    OpenAI  response_format {type: text | json_object | json_schema {name, schema, strict, description}}
    vLLM    structured_outputs {json | regex | choice | grammar | json_object};
            guided_json, guided_regex, guided_choice, guided_grammar, guided_decoding_backend
    SGLang  sampling_params.json_schema (JSON text), .regex, .ebnf (/generate)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from radixserve.sampling_params import STRUCTURED_KINDS, StructuredOutput
from radixserve.server.errors import ApiError, bad_request, check_known

# vLLM's older names, each one structured kind.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# The OpenAI-route fields this module reads (chat and completions).
OPENAI_FIELDS = frozenset({
    "response_format", "structured_outputs", *GUIDED, "guided_decoding_backend",
    "logit_bias", "allowed_token_ids", "bad_words",
})
# SGLang's /generate names in sampling_params, each one structured kind.
SGLANG = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}
BACKENDS = ("xgrammar", "auto")

Parsed = tuple[dict[str, Any], dict[str, str]]  # (SamplingParams kwargs, field -> the client's name)


def _bad(message: str, param: str, code: str | None = None) -> ApiError:
    return bad_request(message, param=param, code=code)


def _known(fields: dict[str, Any], known: set[str]) -> None:
    check_known(fields, known)


def parse_openai(body: dict[str, Any]) -> Parsed:
    """The structured-output and logit-control fields of a chat or completions request."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = _response_format(body.get("response_format"))
    if rf is not None:
        found.append(("response_format.json_schema.schema" if rf.kind == "json" else "response_format", rf))
    so = body.get("structured_outputs")
    if so is not None:
        found.append(_structured_outputs(so))
    for name, kind in GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _structured(name, kind, body[name])))
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in BACKENDS:
        raise _bad(f"guided_decoding_backend must be one of {list(BACKENDS)} (structured output runs on "
                   f"xgrammar), got {backend!r}", param="guided_decoding_backend", code="unsupported_value")
    kw, names = _one(found)
    _logit_controls(body, kw, names, prefix="")
    return kw, names


def parse_sglang(sp: dict[str, Any]) -> Parsed:
    """/generate's sampling_params: SGLang's json_schema, regex, ebnf, our `structured` object, and the
    logit controls. Returns only these fields (the caller takes the others as they are)."""
    found: list[tuple[str, StructuredOutput]] = []
    for name, kind in SGLANG.items():
        if sp.get(name) is not None:
            value = sp[name]
            if name == "json_schema" and not isinstance(value, (str, dict)):
                raise _bad("sampling_params.json_schema must be a JSON schema (JSON text or an object)",
                           param="sampling_params.json_schema")
            found.append((f"sampling_params.{name}", _structured(f"sampling_params.{name}", kind, value)))
    if sp.get("structured") is not None:
        found.append(_structured_object("sampling_params.structured", sp["structured"]))
    kw, names = _one(found)
    _logit_controls(sp, kw, names, prefix="sampling_params.")
    return kw, names


SGLANG_FIELDS = frozenset({*SGLANG, "structured", "logit_bias", "allowed_token_ids", "bad_words"})


def _one(found: list[tuple[str, StructuredOutput]]) -> Parsed:
    if len(found) > 1:
        names = [name for name, _ in found]
        raise _bad(f"give one structured output constraint, not several ({', '.join(names)})", param=names[1])
    if not found:
        return {}, {}
    name, structured = found[0]
    return {"structured": structured}, {"structured": name}


def _structured(param: str, kind: str, value: Any) -> StructuredOutput:
    """StructuredOutput(kind=value), its ValueError a 400 naming `param`."""
    return _checked(param, lambda: StructuredOutput(**{kind: value}))


def _checked(param: str, make: Callable[[], StructuredOutput]) -> StructuredOutput:
    try:
        return make()
    except ValueError as exc:
        raise _bad(f"{param}: {exc}", param=param) from None


def _response_format(rf: Any) -> StructuredOutput | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise _bad("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind == "text":
        _known({f"response_format.{k}": v for k, v in rf.items()}, {"response_format.type"})
        return None
    if kind == "json_object":
        _known({f"response_format.{k}": v for k, v in rf.items()}, {"response_format.type"})
        return StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format.type")
    _known({f"response_format.{k}": v for k, v in rf.items()},
                {"response_format.type", "response_format.json_schema"})
    spec = rf.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise _bad(f"{where} must be an object {{name, schema, strict, description}}", param=where)
    _known({f"{where}.{k}": v for k, v in spec.items()},
                {f"{where}.{k}" for k in ("name", "schema", "strict", "description")})
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name must be a non-empty string", param=f"{where}.name")
    for key, kind_ok in (("strict", bool), ("description", str)):
        if spec.get(key) is not None and not isinstance(spec[key], kind_ok):
            raise _bad(f"{where}.{key} must be a {kind_ok.__name__}", param=f"{where}.{key}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _bad(f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
    return _structured(f"{where}.schema", "json", schema)


def _structured_outputs(so: Any) -> tuple[str, StructuredOutput]:
    return _structured_object("structured_outputs", so)


def _structured_object(param: str, value: Any) -> tuple[str, StructuredOutput]:
    """{json | regex | choice | grammar | json_object}: exactly one set."""
    if not isinstance(value, dict):
        raise _bad(f"{param} must be an object with one of {', '.join(STRUCTURED_KINDS)}", param=param)
    _known({f"{param}.{k}": v for k, v in value.items()}, {f"{param}.{k}" for k in STRUCTURED_KINDS})
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    if len(given) != 1:
        raise _bad(f"{param} must set exactly one of {', '.join(STRUCTURED_KINDS)}", param=param)
    ((kind, v),) = given.items()
    return f"{param}.{kind}", _structured(f"{param}.{kind}", kind, v)


def _logit_controls(body: dict[str, Any], kw: dict[str, Any], names: dict[str, str], prefix: str) -> None:
    """logit_bias (keys are token ids as strings), allowed_token_ids, bad_words; ranges are
    SamplingParams' and the engine's to check."""
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise _bad(f"{prefix}logit_bias must be an object mapping token ids to numbers in [-100, 100]",
                       param=f"{prefix}logit_bias")
        out: dict[int, Any] = {}
        for key, value in bias.items():
            token = key.strip() if isinstance(key, str) else ""
            if not token.isdecimal() or not token.isascii():
                raise _bad(f"{prefix}logit_bias keys must be token ids (decimal integers), got {key!r}",
                           param=f"{prefix}logit_bias")
            out[int(token)] = value
        if out:
            kw["logit_bias"] = out
    ids = body.get("allowed_token_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise _bad(f"{prefix}allowed_token_ids must be a list of token ids", param=f"{prefix}allowed_token_ids")
        kw["allowed_token_ids"] = ids
    words = body.get("bad_words")
    if words is not None:
        if not isinstance(words, list):
            raise _bad(f"{prefix}bad_words must be a list of strings", param=f"{prefix}bad_words")
        kw["bad_words"] = words
    for name in ("logit_bias", "allowed_token_ids", "bad_words"):
        names[name] = f"{prefix}{name}"

