"""radixserve: an LLM serving engine that never computes the same prefix twice.

  radixserve serve                      serve an OpenAI-compatible HTTP API (the built-in model by default)
  radixserve generate "a prompt"        answer one prompt in the terminal
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

from radixserve.engine.options import add_engine_options, engine_kwargs

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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (SIGTERM drains, then exits)")
    add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}). Other local users can "
                           "read a command line (ps): prefer the variable or --api-key-file")
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the API key from this file (its first line)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--max-pending-requests", type=int, default=None,
                   help="sequences admitted at once before answering 503 (default: 4 x max running requests)")
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
    p.set_defaults(func=_run_serve)


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
    from radixserve.server import ServerConfig, curl_example, default_model_name, serve

    config = ServerConfig(  # validated before torch and the model load
        host=args.host,
        port=args.port,
        api_key=api_key(args),
        served_model_name=args.served_model_name,
        max_pending_requests=args.max_pending_requests,
        max_body_bytes=int(args.max_body_mb * 2**20),
        drain_timeout=args.drain_timeout,
        keep_alive_timeout=args.timeout_keep_alive,
        header_timeout=args.timeout_header,
        body_timeout=args.timeout_body,
        send_timeout=args.timeout_send,
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
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
