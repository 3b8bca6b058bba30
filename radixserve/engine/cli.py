"""The `radixserve` command line: generate, serve (more subcommands register themselves)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

API_KEY_ENV = "RADIXSERVE_API_KEY"


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--no-prefix-cache", action="store_true", help="disable the radix prefix cache")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly (default: CUDA graphs where supported)")
    p.add_argument("--no-piecewise-graphs", action="store_true",
                   help="run prefill and mixed steps eagerly (default: graph pieces between attention calls where "
                        "decode graphs run)")
    p.add_argument("--piecewise-max-rows", type=int, default=None,
                   help="the most rows a step replays graph pieces for; bigger steps run eagerly "
                        "(default: the engine's)")
    p.add_argument(
        "--no-overlap-schedule", action="store_true", help="process each step before building the next (default: overlap on CUDA)"
    )
    p.add_argument(
        "--no-fused-kernels", action="store_true", help="skip torch.compile of norms/RoPE/SiLU (default: fused on CUDA)"
    )
    p.add_argument(
        "--no-cascade-attention", action="store_true",
        help="attend to shared prefixes once per sequence, not once per group (default: cascade on CUDA)",
    )
    p.add_argument(
        "--no-triton-decode", action="store_true",
        help="decode attention with FA4 instead of the Triton split-KV kernel (default: Triton where installed)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = {"model": args.model, "device": args.device, "dtype": args.dtype, "enable_prefix_cache": not args.no_prefix_cache}
    if args.no_cuda_graphs:
        kw["cuda_graphs"] = False
    if args.no_piecewise_graphs:
        kw["piecewise_graphs"] = False
    if args.no_overlap_schedule:
        kw["overlap_schedule"] = False
    if args.no_fused_kernels:
        kw["fused_kernels"] = False
    if args.no_cascade_attention:
        kw["cascade_attention"] = False
    if args.no_triton_decode:
        kw["triton_decode"] = False
    for name in ("kv_cache_tokens", "max_running_requests", "attention_backend", "piecewise_max_rows"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt, streaming to the terminal")
    p.add_argument("prompt")
    add_engine_options(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from radixserve import Engine, SamplingParams

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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' (default: $%s). Other local users can read "
                           "a command line (ps): prefer the variable or --api-key-file" % API_KEY_ENV)
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the API key from this file (its first line)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--max-pending-requests", type=int, default=None,
                   help="sequences admitted at once before answering 503 (default: 4 x max running requests)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body size limit in MiB")
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
    from radixserve.engine.server import ServerConfig, curl_example, default_model_name, serve

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
    from radixserve import Engine

    with Engine(**engine_kwargs(args)) as engine:

        def ready(url: str) -> None:
            name = config.served_model_name or default_model_name(engine)
            print(f"radixserve: serving {name} at {url} (OpenAI-compatible API; Ctrl-C or SIGTERM stops)")
            print(f"try:\n{curl_example(url, name, api_key=config.api_key is not None)}", flush=True)

        return serve(engine, config, on_ready=ready)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__)
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
