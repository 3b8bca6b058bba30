"""Tool calling in chat requests: `tools`, `tool_choice`, `parallel_tool_calls`, and tool history.

Requests (OpenAI's shapes, every refusal a 400 naming the field):

    tools                [{"type": "function", "function": {"name", "description"?, "parameters"?}}]
    tool_choice          "none" | "auto" (the default with tools) | "required" | {"type": "function",
                         "function": {"name"}} naming one of the tools
    parallel_tool_calls  true (default) | false: at most one call per reply

Tools reach the chat template (transformers' `tools=`), also with tool_choice "none" (as
vLLM does by default). With "auto" the reply is read by the server's tool call parser
(tool_parser.py); with "required" or a named function the reply is forced into calls by a
JSON schema (`forced_tool_schema`) that structured output enforces (`structured_output`).

History: an assistant message may carry `tool_calls` (its content then may be null), and a
`tool` message answers one with its `tool_call_id`. Arguments reach the template as a dict,
which is what transformers' templates expect (Llama's `tojson`s them; Qwen's takes both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from radixserve.sampling_params import StructuredOutput
from radixserve.server.errors import bad_request
from radixserve.server.tool_formats import PARSERS

MAX_TOOLS = 128  # OpenAI's limit
MAX_NAME = 256
TOOL_PARSER_OPTIONS = ("auto", "none", *PARSERS)


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict[str, Any]] = field(default_factory=list)  # checked, in the template's shape
    choice: str = "none"  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the function a named choice forces
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


# -- requests ----------------------------------------------------------------------------------


def parse_tool_request(body: dict[str, Any]) -> ToolRequest:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat request body."""
    tools = parse_tools(body.get("tools"))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request(f"parallel_tool_calls must be a boolean, got {parallel!r}", param="parallel_tool_calls")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    name = None
    if isinstance(choice, dict):
        name = _named_choice(choice)
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                          f"{{'name': ...}}}}, got {choice!r}", param="tool_choice")
    if choice in ("required", "named") and not tools:
        raise bad_request(f"tool_choice {choice!r} needs tools", param="tool_choice")
    if name is not None and name not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools",
                          param="tool_choice.function.name")
    return ToolRequest(tools=tools, choice=choice if tools else "none", name=name, parallel=parallel is not False)


def _named_choice(choice: dict[str, Any]) -> str:
    function = choice.get("function")
    if set(choice) != {"type", "function"} or choice["type"] != "function" or not isinstance(function, dict):
        raise bad_request("a named tool_choice is {'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if set(function) != {"name"} or not isinstance(function["name"], str):
        raise bad_request("tool_choice.function must be {'name': a string}", param="tool_choice.function")
    return function["name"]


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """A request's `tools`, checked, in the shape chat templates read."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("tools must be an array of tools", param="tools")
    if len(value) > MAX_TOOLS:
        raise bad_request(f"tools holds {len(value)} tools; the limit is {MAX_TOOLS}", param="tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        checked = _tool(tool, f"tools[{i}]")
        name = checked["function"]["name"]
        if name in seen:
            raise bad_request(f"tools[{i}].function.name {name!r} is given twice", param=f"tools[{i}].function.name")
        seen.add(name)
        out.append(checked)
    return out


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise bad_request(f"{where} must be an object", param=where)
    _known(tool, {"type", "function"}, where)
    if tool.get("type") != "function":
        raise bad_request(f"{where}.type must be 'function', got {tool.get('type')!r}", param=f"{where}.type")
    function = tool.get("function")
    where = f"{where}.function"
    if not isinstance(function, dict):
        raise bad_request(f"{where} must be an object", param=where)
    _known(function, {"name", "description", "parameters", "strict"}, where)
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise bad_request(f"{where}.name must be a non-empty string of at most {MAX_NAME} characters",
                          param=f"{where}.name")
    out: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise bad_request(f"{where}.description must be a string", param=f"{where}.description")
        out["description"] = description
    parameters = function.get("parameters")
    if parameters is not None:
        _check_parameters(parameters, f"{where}.parameters")
        out["parameters"] = parameters
    if function.get("strict") not in (None, False):
        raise bad_request(f"{where}.strict=true is not supported: tool_choice 'auto' calls are not held to the "
                          "schema (use tool_choice 'required' or a named function)", param=f"{where}.strict",
                          code="unsupported_value")
    return {"type": "function", "function": out}


def _check_parameters(schema: Any, where: str) -> None:
    """A JSON schema of an object: its `type` (if given) "object", `properties` an object of
    schemas, `required` an array of strings."""
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema object", param=where)
    if schema.get("type", "object") != "object":
        raise bad_request(f"{where}.type must be 'object', got {schema.get('type')!r}", param=f"{where}.type")
    props = schema.get("properties")
    if props is not None and (not isinstance(props, dict) or not all(isinstance(v, (dict, bool))
                                                                      for v in props.values())):
        raise bad_request(f"{where}.properties must map names to schemas", param=f"{where}.properties")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise bad_request(f"{where}.required must be an array of strings", param=f"{where}.required")


def _known(obj: dict[str, Any], keys: set[str], where: str) -> None:
    for key in obj:
        if key not in keys:
            raise bad_request(f"{where}.{key} is not a known field (allowed: {sorted(keys)})", param=f"{where}.{key}",
                              code="unknown_parameter")


# -- history ------------------------------------------------------------------------------------


def parse_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, with each call's arguments as a dict (for the template)."""
    if not isinstance(value, list):
        raise bad_request(f"{where} must be an array of tool calls", param=where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise bad_request(f"{at} must be an object", param=at)
        _known(call, {"id", "type", "function"}, at)
        if not isinstance(call.get("id"), str):
            raise bad_request(f"{at}.id must be a string", param=f"{at}.id")
        if call.get("type", "function") != "function":
            raise bad_request(f"{at}.type must be 'function'", param=f"{at}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{at}.function must be an object", param=f"{at}.function")
        _known(function, {"name", "arguments"}, f"{at}.function")
        if not isinstance(function.get("name"), str):
            raise bad_request(f"{at}.function.name must be a string", param=f"{at}.function.name")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": _arguments(function.get("arguments"), at)}})
    return out


def _arguments(value: Any, at: str) -> dict[str, Any]:
    where = f"{at}.function.arguments"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(f"{where} must be a JSON object (as text)", param=where) from None
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be a JSON object (as text)", param=where)
    return value


# -- the chat template --------------------------------------------------------------------------


def template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else ""


def template_tool_parser(template: str) -> str | None:
    """The tool call format a chat template teaches (None if it teaches none this server reads):
    `<tool_call>` blocks are hermes; Llama 3.1's `<|python_tag|>` or its "parameters" JSON is llama3_json."""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters": dictionary of argument name' in template:
        return "llama3_json"
    return None


def check_template_shows(tools: list[dict[str, Any]], template: str) -> None:
    """Tools only where the chat template shows them to the model (else they would do nothing: a 400)."""
    if tools and "tools" not in template:
        raise bad_request("this model's chat template does not show tools to the model", param="tools",
                          code="unsupported_value")


def resolve_tool_parser(configured: str, template: str) -> str | None:
    """The server's --tool-call-parser for this template: "auto" picks from it, "none" is None."""
    if configured == "auto":
        return template_tool_parser(template)
    return None if configured == "none" else configured


# -- forced calls -------------------------------------------------------------------------------


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_tool_schema(tools: ToolRequest) -> dict[str, Any] | None:
    """The JSON schema the reply must follow for a forced tool choice (None for "none"/"auto").

    "required": an array of 1.. calls (exactly 1 without parallel_tool_calls), each
    `{"name": <one tool's name>, "arguments": <that tool's parameters>}` (name first, so the
    reply streams as calls: tool_parser's "required" format reads it). A named function: its
    parameters schema; the reply is that call's arguments (tool_parser's "named" format).
    """
    if tools.choice == "named":
        return _parameters(next(t for t in tools.tools if t["function"]["name"] == tools.name))
    if tools.choice != "required":
        return None
    calls = [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                          "arguments": _parameters(t)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools.tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not tools.parallel:
        schema["maxItems"] = 1
    return schema


def forced_format(tools: ToolRequest) -> str:
    """tool_parser.make_parser's format for a forced reply."""
    return f"named:{tools.name}" if tools.choice == "named" else "required"


def structured_output(schema: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams fields that hold the reply to `schema`: the one place a forced tool choice
    becomes structured output."""
    return {"structured": StructuredOutput(json=schema)}


def tool_output(tools: ToolRequest, configured: str, template: str) -> tuple[str | None, int | None, dict[str, Any]]:
    """How a chat request's replies are read for calls: (tool_parser's format or None, the call
    limit, SamplingParams fields that force the calls). 400s for what the server cannot do."""
    check_template_shows(tools.tools, template)
    if tools.choice == "none":
        return None, None, {}
    max_calls = None if tools.parallel else 1
    schema = forced_tool_schema(tools)
    if schema is not None:
        return forced_format(tools), max_calls, structured_output(schema)
    fmt = resolve_tool_parser(configured, template)
    if fmt is None:
        raise bad_request("tool_choice 'auto' needs a tool call parser, and this model's chat template teaches no "
                          f"format this server reads ({', '.join(PARSERS)}): start the server with "
                          "--tool-call-parser, or send tool_choice 'none'", param="tool_choice",
                          code="unsupported_value")
    return fmt, max_calls, {}
