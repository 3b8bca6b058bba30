"""radixserve: an LLM serving engine that never computes the same prefix twice.

  radixserve serve                      serve an OpenAI-compatible HTTP API (the built-in model by default)
  radixserve generate "a prompt"        answer one prompt in the terminal
  radixserve router --replica URL ...   route that API over running servers, by prompt prefix
  radixserve replay TRACE.jsonl         simulate (or replay live) a request trace and report cache hits
  radixserve gen-trace OUT.jsonl        write a synthetic prefix-sharing trace

Run `radixserve COMMAND --help` for a command's options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from radixserve.engine.options import add_engine_options, engine_kwargs

if TYPE_CHECKING:
    from radixserve.router.state import RouterConfig
    from radixserve.server.state import ServerConfig

API_KEY_ENV = "RADIXSERVE_API_KEY"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt, streaming to the terminal")
    p.add_argument("prompt", help="the user's message (sent through the chat template unless --raw)")
    add_engine_options(p)
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens at most (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 disables (default: 1)")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens; -1 disables (default: -1)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top one's (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same output")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.set_defaults(func=_run_generate)


def _run_ranks_only(args: argparse.Namespace) -> int | None:
    """With --node-rank > 0 this host runs its tensor-parallel ranks (rank 0's host serves):
    their exit status once they stop; None on rank 0's host."""
    if not args.node_rank:
        return None
    from radixserve.engine.config import EngineConfig
    from radixserve.engine.model_files import resolve_model_path
    from radixserve.engine.tp_driver import run_node

    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    failed = run_node(config, resolve_model_path(config.model, config.show_progress))
    return 1 if failed else 0


def _run_generate(args: argparse.Namespace) -> int:
    from radixserve.engine.engine import Engine
    from radixserve.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    ranks_only = _run_ranks_only(args)
    if ranks_only is not None:
        return ranks_only
    with Engine(**engine_kwargs(args)) as engine:
        chat = not args.raw and getattr(engine.tokenizer, "chat_template", None) is not None
        prompt = engine.apply_chat_template([{"role": "user", "content": args.prompt}]) if chat else args.prompt
        for delta in engine.stream(prompt, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _add_http_options(p: argparse.ArgumentParser, port: int = 8000) -> None:
    """The listening, API key and connection options that `serve` and `router` share."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"0 picks a free port (default: {port})")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}). Other local users can "
                           "read a command line (ps): prefer the variable or --api-key-file")
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the API key from this file (its first line)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body size limit in MiB (default: 16)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests before cutting them (default: 60)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="close a connection that sends nothing for this many seconds (default: 5)")
    p.add_argument("--timeout-header", type=float, default=10.0,
                   help="close a connection whose request headers take longer than this to arrive (default: 10)")
    p.add_argument("--timeout-body", type=float, default=60.0,
                   help="answer 408 and close when a request body takes longer than this to arrive (default: 60)")
    p.add_argument("--timeout-send", type=float, default=60.0,
                   help="close a connection that reads nothing of its answer for this long (default: 60)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (SIGTERM drains, then exits)")
    add_engine_options(p)
    _add_http_options(p)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--max-pending-requests", type=int, default=None,
                   help="sequences admitted at once before answering 503 (default: 4 x max running requests)")
    p.add_argument("--responses-store-size", type=int, default=1024,
                   help="Responses API results kept in memory for previous_response_id (default: 1024; 0: none)")
    p.add_argument("--tool-call-parser", default="auto", metavar="{auto,none,hermes,llama3_json}",
                   help="how chat replies are read for tool calls: auto picks the format the chat template "
                        "teaches (<tool_call> blocks: hermes; <|python_tag|>: llama3_json); none reads none "
                        "(default: auto)")
    p.add_argument("--reasoning-parser", default=None, metavar="{qwen3,deepseek_r1}",
                   help="move <think> text into reasoning_content (default: none; the text stays content)")
    dp = p.add_argument_group("data parallelism (replicas behind a router; see docs/scale.md)")
    dp.add_argument("--dp", type=int, default=1, metavar="N",
                    help="run N engine replicas (one per GPU, or N processes on the CPU) behind a router on "
                         "--port (default: 1, no router)")
    add_router_options(dp)
    p.set_defaults(func=_run_serve)


# (flag, RouterConfig field, type, help): RouterConfig holds the defaults; a flag left out stays None.
_ROUTER_FLAGS = (
    ("--policy", "policy", str, "how requests are spread over replicas"),
    ("--router-cache-tokens", "cache_tokens", int,
     "bound of each replica's approximate prefix tree at the router, about tokens; set it to a replica's KV cache "
     "size (serve --dp: --kv-cache-tokens where given)"),
    ("--cache-threshold", "cache_threshold", float,
     "cache_aware: below this share of the prompt matched, the least loaded replica"),
    ("--balance-abs-threshold", "balance_abs", int,
     "cache_aware: load is imbalanced when max - min requests in flight exceeds this"),
    ("--balance-rel-threshold", "balance_rel", float, "... and max > this x min; then the least loaded replica wins"),
    ("--health-interval", "health_interval", float, "seconds between health checks of every replica"),
    ("--health-timeout", "health_timeout", float, "a health check's timeout in seconds"),
    ("--connect-timeout", "connect_timeout", float, "seconds to connect to a replica before trying another"),
    ("--max-attempts", "max_attempts", int, "replicas a request may be sent to before it fails"),
)


def add_router_options(p: argparse._ActionsContainer) -> None:
    """The routing options that `router` and `serve --dp` share."""
    from radixserve.router.policy import POLICIES
    from radixserve.router.state import RouterConfig

    defaults = RouterConfig()
    for flag, name, kind, help_text in _ROUTER_FLAGS:
        p.add_argument(flag, dest="router_" + name, type=kind, default=None,
                       choices=POLICIES if name == "policy" else None,
                       metavar=None if name == "policy" else ("N" if kind is int else "X"),
                       help=f"{help_text} (default: {getattr(defaults, name)})")


def _router_flags_given(args: argparse.Namespace) -> list[str]:
    return [flag for flag, name, _, _ in _ROUTER_FLAGS if getattr(args, "router_" + name, None) is not None]


def _add_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="route the HTTP API over running replicas (prefix-aware)",
                       description="A router in front of `radixserve serve` replicas, speaking the same API.")
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="a replica's base URL, e.g. http://10.0.0.2:8000 (repeatable; more can join through "
                        "POST /router/replicas)")
    _add_http_options(p)
    add_router_options(p)
    p.set_defaults(func=_run_router)


def server_config(args: argparse.Namespace, **extra: Any) -> ServerConfig:
    """The `ServerConfig` of `_add_http_options`' flags (validated: ValueError names the field)."""
    from radixserve.server.state import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=api_key(args),
        max_body_bytes=int(args.max_body_mb * 2**20),
        drain_timeout=args.drain_timeout,
        keep_alive_timeout=args.timeout_keep_alive,
        header_timeout=args.timeout_header,
        body_timeout=args.timeout_body,
        send_timeout=args.timeout_send,
        **extra,
    )


def router_config(args: argparse.Namespace, replicas: Sequence[str], server: ServerConfig) -> RouterConfig:
    """The `RouterConfig` of `add_router_options`' flags (validated: ValueError names the field)."""
    from radixserve.router.state import RouterConfig

    kw = {name: getattr(args, "router_" + name) for _, name, _, _ in _ROUTER_FLAGS}
    if kw["cache_tokens"] is None:
        kw["cache_tokens"] = getattr(args, "kv_cache_tokens", None)
    return RouterConfig(replicas=tuple(replicas), server=server, **{k: v for k, v in kw.items() if v is not None})


def _run_router(args: argparse.Namespace) -> int:
    from radixserve.router.app import serve_router

    config = router_config(args, args.replica, server_config(args))
    if not config.replicas:
        print("radixserve: no --replica yet: add them with POST /router/replicas", file=sys.stderr)

    def ready(url: str) -> None:
        print(f"radixserve: routing at {url} over {len(config.replicas)} replicas ({config.policy}); "
              "Ctrl-C or SIGTERM stops", flush=True)

    return serve_router(config, on_ready=ready)


def api_key(args: argparse.Namespace) -> str | None:
    """The serve command's API key: --api-key, else --api-key-file's first line, else $RADIXSERVE_API_KEY."""
    if args.api_key is not None:
        return args.api_key
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api_key_file: cannot read {args.api_key_file}: {exc}") from None
        if not key:
            raise ValueError(f"api_key_file: {args.api_key_file} holds no key on its first line")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _run_serve(args: argparse.Namespace) -> int:
    from radixserve.server import curl_example, default_model_name, serve

    # validated before torch and the model load
    config = server_config(args, served_model_name=args.served_model_name,
                           max_pending_requests=args.max_pending_requests,
                           responses_store_size=args.responses_store_size,
                           tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    if args.dp != 1:
        return _run_dp(args, config)
    if _router_flags_given(args):
        raise ValueError(f"{', '.join(_router_flags_given(args))}: routing options need --dp N with N > 1")
    from radixserve.engine.engine import Engine

    ranks_only = _run_ranks_only(args)
    if ranks_only is not None:
        return ranks_only
    with Engine(**engine_kwargs(args)) as engine:

        def ready(url: str) -> None:
            name = config.served_model_name or default_model_name(engine)
            print(f"radixserve: serving {name} at {url} (OpenAI-compatible API; Ctrl-C or SIGTERM stops)")
            print(f"try:\n{curl_example(url, name, api_key=config.api_key is not None)}", flush=True)

        return serve(engine, config, on_ready=ready)


def _dp_devices(args: argparse.Namespace) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES value of each `serve --dp` replica; None to run them on the CPU."""
    if args.device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        if args.device is not None:
            raise ValueError(f"device {args.device!r}: no CUDA GPU is visible")
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def _engine_flags(args: argparse.Namespace, one_gpu: bool) -> list[str]:
    """The engine flags given to `serve`, for its replicas (each sees its own GPUs: one, or
    tensor_parallel_size of them, the first as `cuda`)."""
    import dataclasses

    from radixserve.engine.config import EngineConfig
    from radixserve.engine.options import engine_flag

    flags: list[str] = []
    for f in dataclasses.fields(EngineConfig):
        value = getattr(args, f.name, None)
        if f.name == "device" and one_gpu and isinstance(value, str) and value.startswith("cuda"):
            value = "cuda"
        if value is None:
            continue
        flag = engine_flag(f)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


# serve's own options (beside the engine's) that each `serve --dp` replica gets as given.
_REPLICA_SERVE_FLAGS = (
    ("--served-model-name", "served_model_name"),
    ("--max-pending-requests", "max_pending_requests"),
    ("--responses-store-size", "responses_store_size"),
    ("--tool-call-parser", "tool_call_parser"),
    ("--reasoning-parser", "reasoning_parser"),
)


def _run_dp(args: argparse.Namespace, config: ServerConfig) -> int:
    from radixserve.router.launch import ReplicaFleet, run_fleet
    from radixserve.server.app import curl_example

    if args.dp < 1:
        raise ValueError(f"dp must be >= 1, got {args.dp}")
    routing = router_config(args, (), config)  # validated before any replica starts
    devices = _dp_devices(args)
    tp = getattr(args, "tensor_parallel_size", None) or 1
    if devices is not None and tp > 1:  # each replica's ranks take tp GPUs of their own
        devices = [",".join(devices[i : i + tp]) for i in range(0, len(devices) - tp + 1, tp)]
    argv = [sys.executable, "-m", "radixserve", *["-v"] * args.verbose, "serve",
            *_engine_flags(args, devices is not None),
            "--host", "127.0.0.1", "--port", "0", "--drain-timeout", str(args.drain_timeout)]
    for flag, dest in _REPLICA_SERVE_FLAGS:
        if getattr(args, dest) is not None:
            argv += [flag, str(getattr(args, dest))]
    fleet = ReplicaFleet(argv, args.dp, devices, config.api_key, args.drain_timeout)

    def ready(url: str, fleet: ReplicaFleet) -> None:
        name = fleet.replicas[0].model_name or ""
        where = "GPUs " + ",".join(devices[: args.dp]) if devices is not None else "the CPU"
        for r in fleet.replicas:
            print(f"radixserve: replica {r.index} at {r.url} (pid {r.proc.pid if r.proc else '-'})")
        print(f"radixserve: serving {name} at {url} ({args.dp} replicas on {where}, {routing.policy} routing; "
              "Ctrl-C or SIGTERM stops)")
        print(f"try:\n{curl_example(url, name, api_key=config.api_key is not None)}", flush=True)

    return run_fleet(fleet, routing, ready)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_router(sub)
    from radixserve.replay.cli import register as register_replay

    register_replay(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"radixserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
