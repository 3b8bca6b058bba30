"""The HTTP server: the OpenAI-compatible API and the native routes over an `Engine`.

    serve(engine, ServerConfig(port=8000))              # blocking; SIGTERM/SIGINT drain then return
    with BackgroundServer(engine, ServerConfig(port=0)) as srv:   # its own thread and loop
        ...

`app.py` (the application, lifecycle), `routes.py` (handlers), `openai_api.py`
(request parsing), `responses.py` (response bodies), `native_api.py` (/generate), `responses_api.py` and
`response_store.py` (/v1/responses), `tools.py`, `tool_parser.py`, `tool_formats.py`, `reasoning.py` and
`chat_output.py` (tool calls and reasoning in chat), `tokenize.py` (/tokenize, /detokenize), `metrics.py`
(prometheus_client), `middleware.py` (errors, body deadline, drain, API key), `transport.py` (connection
timeouts, access log, listening and draining), `state.py` (config and shared state).

The names below load on first use, so that the router (radixserve.router), which shares
`middleware.py`, `transport.py` and `state.ServerConfig`, imports neither the engine nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixserve.server.app import BackgroundServer, build_app, curl_example, run_app, serve
    from radixserve.server.state import ServerConfig, ServerState, default_model_name

_LAZY = {
    "BackgroundServer": "app", "build_app": "app", "curl_example": "app", "run_app": "app", "serve": "app",
    "ServerConfig": "state", "ServerState": "state", "default_model_name": "state",
}

__all__ = [
    "BackgroundServer", "ServerConfig", "ServerState", "build_app", "curl_example", "default_model_name", "run_app",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'radixserve.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"radixserve.server.{module}"), name)
