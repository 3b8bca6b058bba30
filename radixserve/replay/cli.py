"""`radixserve replay` and `radixserve gen-trace` (also `python -m radixserve.replay`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import logging
import sys
from collections.abc import Sequence
from typing import Any

from radixserve.replay.formats import FORMATS, TraceReader, TraceRequest
from radixserve.replay.report import build_report, format_report, write_json
from radixserve.replay.simulate import POLICIES, RunSpec, SimOptions, simulate
from radixserve.router.policy import POLICIES as ROUTES

logger = logging.getLogger(__name__)

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9}


def parse_tokens(text: str) -> int | None:
    """'4096', '512k', '1.5M', '2G' -> tokens; 'unlimited' / 'inf' / 'none' -> None."""
    t = text.strip().lower()
    if t in ("unlimited", "inf", "none"):
        return None
    scale = _SUFFIX.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 4096, 512k, 1.5M, unlimited)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a capacity must be a whole number of tokens >= 1, got {text!r}")
    return int(value)


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return v


def _add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay", help="replay a request trace through the prefix cache (simulated or live)",
        description="Replay a request trace: cache-hit analysis by simulation, or live against an engine.",
    )
    p.add_argument("trace", help="JSONL trace (.gz too): mooncake, bailian or tokens format")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the first line")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per hash id (default: mooncake 512, bailian 16)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer for 'prompt' text in tokens traces")
    p.add_argument("--capacity", nargs="+", type=parse_tokens, default=[None], metavar="N",
                   help="cache capacities in tokens, e.g. 1M 4M unlimited (default: unlimited)")
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=["lru"], metavar="P",
                   help=f"eviction policies among {', '.join(POLICIES)} (default: lru)")
    p.add_argument("--warmup", type=_fraction, default=0.0, metavar="FRACTION",
                   help="replay this share of the requests before counting (steady state)")
    p.add_argument("--window", type=float, default=None, metavar="SECONDS", help="hit-rate-over-time bin width")
    p.add_argument("--engine-accounting", action="store_true",
                   help="count as the engine does: cache each output's KV, always compute a prompt's last token")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write replay_capacity.png and replay_time.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster = p.add_argument_group("cluster (data-parallel replicas; see docs/scale.md)")
    cluster.add_argument("--replicas", type=int, default=None, metavar="N",
                         help="also simulate N replicas of --capacity tokens each behind a router; the runs above "
                              "then use one cache of N x --capacity tokens, for comparison")
    cluster.add_argument("--route", nargs="+", choices=ROUTES, default=None, metavar="R",
                         help=f"routing policies among {', '.join(ROUTES)} (default: cache_aware)")
    cluster.add_argument("--prefill-tps", type=float, default=None,
                         help="load model: prompt tokens a replica prefills per second (default 10000)")
    cluster.add_argument("--decode-tps", type=float, default=None,
                         help="load model: output tokens per second of one request (default 50)")
    cluster.add_argument("--cache-threshold", type=float, default=None,
                         help="cache_aware: share of the prompt a replica must hold to win (default 0.3)")
    live = p.add_argument_group("live mode")
    live.add_argument("--live", action="store_true", help="send the requests to an engine (in-process, or --url)")
    live.add_argument("--url", default=None, help="a running server's base URL (implies --live)")
    live.add_argument("--time-scale", type=float, default=1.0,
                      help="send at timestamp * SCALE seconds (0.1: ten times faster; 0: all at once)")
    live.add_argument("--max-concurrency", type=int, default=16)
    live.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N requests")
    live.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer prompts (at a block boundary)")
    live.add_argument("--max-output-tokens", type=int, default=None, help="cap each request's output length")
    live.add_argument("--token-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                      help="token ids made from hash ids lie in [LOW, HIGH) (default 1000 32000)")
    live.add_argument("--content-seed", type=int, default=0, help="seed of the tokens made from hash ids")
    from radixserve.engine.options import add_engine_options

    add_engine_options(p, title="engine options (with --live)")
    p.set_defaults(func=run_replay)


def _add_gen_trace(sub: Any) -> None:
    from radixserve.replay.gentrace import GenConfig

    d = GenConfig()
    p = sub.add_parser(
        "gen-trace", help="write a synthetic shared-prefix trace (tokens JSONL)",
        description="Synthetic shared-prefix workload: groups sharing a system prompt, multi-turn sessions.",
    )
    p.add_argument("output", help="the JSONL file to write")
    p.add_argument("--groups", type=int, default=d.groups, help="distinct system prompts")
    p.add_argument("--prompts-per-group", type=int, default=d.prompts_per_group, help="sessions per group")
    p.add_argument("--system-len", type=int, default=d.system_len)
    p.add_argument("--question-len", type=int, default=d.question_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--turns", type=int, default=d.turns, help="turns per session (multi-turn when > 1)")
    p.add_argument("--zipf", type=float, default=d.zipf, help="group popularity skew (0: uniform)")
    p.add_argument("--rate", type=float, default=d.rate, help="sessions started per second")
    p.add_argument("--think-time", type=float, default=d.think_time, help="seconds between a session's turns")
    p.add_argument("--tenants", type=int, default=d.tenants, help="tag groups with this many tenants")
    p.add_argument("--length-jitter", type=float, default=d.length_jitter)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--token-range", type=int, nargs=2, default=list(d.token_range), metavar=("LOW", "HIGH"))
    p.set_defaults(func=run_gen_trace)


def register(subparsers: Any) -> None:
    """Adds `replay` and `gen-trace` to an argparse subparsers object."""
    _add_replay(subparsers)
    _add_gen_trace(subparsers)


# ------------------------------------------------------------------------ replay


def _tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    return lambda text: tok.encode(text)


def _trace_info(reader: TraceReader) -> dict[str, Any]:
    return {"path": reader.path, "format": reader.format, "block_size": reader.block_size}


def run_replay(args: argparse.Namespace) -> int:
    reader = TraceReader(args.trace, args.format, args.block_size, args.skip_bad, _tokenizer(args.tokenizer))
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    cluster_flags = {"--route": args.route, "--prefill-tps": args.prefill_tps, "--decode-tps": args.decode_tps,
                     "--cache-threshold": args.cache_threshold}
    given = [flag for flag, value in cluster_flags.items() if value is not None]
    if args.replicas is None and given:
        raise ValueError(f"{', '.join(given)}: cluster options need --replicas N")
    scale = args.replicas or 1  # with --replicas: one cache as large as the whole cluster's
    capacities = [None if c is None else c * scale for c in dict.fromkeys(args.capacity)]
    specs = [RunSpec(p, c) for p, c in itertools.product(args.policy, capacities)]
    options = SimOptions(warmup=args.warmup, window_s=args.window, insert_output=args.engine_accounting,
                         compute_last=args.engine_accounting, progress=not args.no_progress)
    live = None
    if args.live or args.url:
        requests = _live_requests(reader, args)
        result = simulate(requests, specs, options)
        live = _run_live(requests, args)
    else:
        result = simulate(lambda: iter(reader), specs, options)
    trace = {**_trace_info(reader), "skipped_lines": reader.skipped, **result.trace}
    if reader.first_error:
        trace["first_skipped"] = reader.first_error
    doc = build_report(trace, result.runs, live)
    if args.replicas is not None:
        doc["cluster"] = _run_cluster(reader, args, options)
    print(format_report(doc))
    if args.json:
        write_json(doc, args.json)
    if args.plot:
        from radixserve.replay.plot import plot_report

        for path in plot_report(doc, args.plot):
            logger.info("wrote %s", path)
    return 0


def _run_cluster(reader: TraceReader, args: argparse.Namespace, options: SimOptions) -> list[dict[str, Any]]:
    from radixserve.replay.cache_sim import ONLINE_POLICIES
    from radixserve.replay.cluster import ClusterSpec, simulate_cluster

    given = {"prefill_tps": args.prefill_tps, "decode_tps": args.decode_tps, "cache_threshold": args.cache_threshold}
    options_kw = {k: v for k, v in given.items() if v is not None}  # ClusterSpec holds the defaults
    specs = [
        ClusterSpec(args.replicas, route, capacity, policy, **options_kw)
        for route in dict.fromkeys(args.route or ["cache_aware"]) for policy in args.policy
        if policy in ONLINE_POLICIES for capacity in dict.fromkeys(args.capacity)
    ]
    if not specs:
        raise ValueError("--replicas needs an online eviction policy among --policy (belady is offline)")
    return simulate_cluster(lambda: iter(reader), specs, options)


def _live_requests(reader: TraceReader, args: argparse.Namespace) -> list[TraceRequest]:
    """The requests live mode sends (and simulates): the first --limit, cut to the caps."""
    from radixserve.replay.content import truncate

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out = []
    for req in itertools.islice(reader, args.limit):
        if args.max_prompt_tokens is not None:
            req = truncate(req, args.max_prompt_tokens)
        if args.max_output_tokens is not None:
            req = dataclasses.replace(req, output_length=min(req.output_length, args.max_output_tokens))
        out.append(req)
    if not out:
        raise ValueError(f"{reader.path}: no requests to replay")
    return out


def _run_live(requests: list[TraceRequest], args: argparse.Namespace) -> dict[str, Any]:
    from radixserve.replay.content import DEFAULT_TOKEN_RANGE
    from radixserve.replay.live import EngineTarget, HttpTarget, LiveOptions, compare_with_simulation, replay_live

    options = LiveOptions(time_scale=args.time_scale, max_concurrency=args.max_concurrency,
                          token_range=tuple(args.token_range or DEFAULT_TOKEN_RANGE), seed=args.content_seed,
                          progress=not args.no_progress)
    if args.url:
        live = asyncio.run(replay_live(requests, HttpTarget(args.url), options))
        if args.kv_cache_tokens:
            compare_with_simulation(requests, live, args.kv_cache_tokens)
        else:
            logger.warning("pass --kv-cache-tokens (the server's KV capacity) to compare with the simulation")
        return live
    from radixserve.engine.engine import Engine
    from radixserve.engine.options import engine_kwargs

    with Engine(**engine_kwargs(args)) as engine:
        live = asyncio.run(replay_live(requests, EngineTarget(engine), options))
        stats = engine.stats()
        policy = engine.config.eviction_policy
    return compare_with_simulation(requests, live, int(stats["kv_capacity_tokens"]), policy)


# --------------------------------------------------------------------- gen-trace


def run_gen_trace(args: argparse.Namespace) -> int:
    from radixserve.replay.gentrace import GenConfig, write_trace

    cfg = GenConfig(
        groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_len,
        question_len=args.question_len, output_len=args.output_len, turns=args.turns, zipf=args.zipf,
        rate=args.rate, think_time=args.think_time, tenants=args.tenants, length_jitter=args.length_jitter,
        seed=args.seed, token_range=tuple(args.token_range),
    )
    n = write_trace(cfg, args.output)
    print(f"wrote {n} requests to {args.output}")
    return 0


# -------------------------------------------------------------------- standalone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m radixserve.replay", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug logging")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # TraceFormatError included: names the file and line
        print(f"radixserve: error: {exc}", file=sys.stderr)
        return 2
