"""What the HTTP server's parts share: its configuration, and the state its handlers read.

`ServerConfig` is validated on construction; `ServerState` lives in the app under `STATE`
and is touched only on the event loop thread (no locks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from radixserve.server.metrics import ServerMetrics
from radixserve.server.reasoning import REASONING_PARSERS
from radixserve.server.response_store import ResponseStore
from radixserve.server.responses import TokenText
from radixserve.server.tools import TOOL_PARSER_OPTIONS

if TYPE_CHECKING:
    from radixserve.engine.engine import Engine


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see `BackgroundServer.url`)
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    served_model_name: str | None = None  # None: the model directory's name (the built-in's own name)
    # Sequences (prompts x n) admitted at once, running or queued in the engine; beyond it, 503 + Retry-After.
    max_pending_requests: int | None = None  # None: 4 x the engine's max_running_requests
    max_body_bytes: int = 16 * 2**20
    # Responses API results kept for previous_response_id and GET /v1/responses/{id} (least recently
    # used first out; also at most responses_store_chars characters of text); 0 stores none.
    responses_store_size: int = 1024
    responses_store_chars: int = 64 * 2**20
    drain_timeout: float = 60.0  # seconds SIGTERM waits for in-flight requests before cutting them
    retry_after_s: int = 1
    # A connection is closed when it sends nothing for keep_alive_timeout seconds (before its first
    # request or between requests), takes longer than header_timeout from a request's first byte to the
    # end of its headers, or longer than body_timeout from there to the end of the body (then 408), or
    # reads nothing of an answer for send_timeout seconds while the server's send buffer is full.
    keep_alive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    # How chat replies are read for tool calls: "auto" picks the format the chat template teaches
    # (tools.template_tool_parser), "none" reads none (tool_choice "auto" is then refused).
    tool_call_parser: str = "auto"
    reasoning_parser: str | None = None  # "qwen3" | "deepseek_r1": <think> text to reasoning_content

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        if self.max_pending_requests is not None and (
            not isinstance(self.max_pending_requests, int) or self.max_pending_requests < 1
        ):
            raise ValueError(f"max_pending_requests must be an integer >= 1, got {self.max_pending_requests!r}")
        for name in ("responses_store_size", "responses_store_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout!r}")
        if self.tool_call_parser not in TOOL_PARSER_OPTIONS:
            raise ValueError(f"tool_call_parser must be one of {TOOL_PARSER_OPTIONS}, got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS} or None, "
                             f"got {self.reasoning_parser!r}")
        for name in ("keep_alive_timeout", "header_timeout", "body_timeout", "send_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


class ServerState:
    """What the handlers share; touched only on the event loop thread (no locks)."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or default_model_name(engine)
        self.max_pending = config.max_pending_requests or 4 * engine.config.max_running_requests
        # The engine refuses a prompt of this many tokens or more (context or KV pool, whichever is smaller).
        self.context_limit: int = engine.context_limit
        self.token_text = TokenText(engine.tokenizer)
        self.created = int(time.time())
        self.pending = 0  # sequences admitted and not finished (routes.admit counts them in)
        self.inflight = 0  # HTTP requests inside a handler
        self.metrics = ServerMetrics(self.model_name, self.context_limit, engine.stats, self._gauges)
        self.responses = ResponseStore(config.responses_store_size, config.responses_store_chars)
        self.draining = False
        self.generations: set[Any] = set()  # routes.Generation's running now (cut at the drain timeout)

    def _gauges(self) -> dict[str, float]:
        return {"pending_requests": self.pending, "http_inflight_requests": self.inflight}

    def engine_alive(self) -> bool:
        return self.engine.is_alive()


def default_model_name(engine: Engine) -> str:
    if engine.config.model is None:
        from radixserve.model_runner.builtin_model import BUILTIN_MODEL_NAME

        return BUILTIN_MODEL_NAME
    return Path(engine.config.model).expanduser().resolve().name


STATE: web.AppKey[ServerState] = web.AppKey("radixserve_state")  # the app's ServerState


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]
