"""The HTTP server: the OpenAI-compatible API and the native routes over an `Engine`.

    serve(engine, ServerConfig(port=8000))              # blocking; SIGTERM/SIGINT drain then return
    with BackgroundServer(engine, ServerConfig(port=0)) as srv:   # its own thread and loop
        ...

`app.py` (the application, middlewares, lifecycle), `routes.py` (handlers), `openai_api.py`
(request parsing), `responses.py` (response bodies), `native_api.py` (/generate), `responses_api.py` and
`response_store.py` (/v1/responses), `tools.py`, `tool_parser.py`, `tool_formats.py`, `reasoning.py` and
`chat_output.py` (tool calls and reasoning in chat), `tokenize.py` (/tokenize, /detokenize), `metrics.py`
(prometheus_client), `transport.py` (connection timeouts, access log), `state.py` (config and shared state).
"""

from radixserve.server.app import BackgroundServer, build_app, curl_example, run_app, serve
from radixserve.server.state import ServerConfig, ServerState, default_model_name

__all__ = [
    "BackgroundServer", "ServerConfig", "ServerState", "build_app", "curl_example", "default_model_name", "run_app",
    "serve",
]
