"""`radixserve replay` / `gen-trace` end to end, and the synthetic workload generator."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from radixserve.replay.cli import main, parse_tokens, register
from radixserve.replay.gentrace import GenConfig, generate_trace


def unlimited_hits(records: list[dict]) -> int:
    """Independent count: each prompt hits its longest token prefix seen before."""
    seen: set[tuple] = set()
    hit = 0
    for r in records:
        ids = tuple(r["input_ids"])
        k = 0
        while k < len(ids) and ids[: k + 1] in seen:
            k += 1
        hit += k
        seen.update(ids[: j + 1] for j in range(len(ids)))
    return hit


def test_gen_trace_single_turn_shares_system_prompts() -> None:
    cfg = GenConfig(groups=3, prompts_per_group=4, system_len=32, question_len=8, output_len=4, seed=1)
    recs = list(generate_trace(cfg))
    assert len(recs) == 12
    assert [r["timestamp"] for r in recs] == sorted(r["timestamp"] for r in recs)
    heads = Counter(tuple(r["input_ids"][:32]) for r in recs)
    assert heads == Counter(dict.fromkeys(heads, 4))
    assert all(len(r["input_ids"]) == 40 and r["output_len"] == 4 for r in recs)
    assert unlimited_hits(recs) == (12 - 3) * 32


def test_gen_trace_multi_turn_and_zipf() -> None:
    cfg = GenConfig(groups=2, prompts_per_group=3, system_len=16, question_len=4, output_len=5, turns=3,
                    think_time=100.0, rate=10.0, tenants=2)
    recs = list(generate_trace(cfg))
    assert len(recs) == 2 * 3 * 3
    by_session: dict[str, list[dict]] = {}
    for r in recs:
        by_session.setdefault(r["session"], []).append(r)
    for turns in by_session.values():
        assert [t["turn"] for t in turns] == [1, 2, 3]
        for prev, cur in zip(turns, turns[1:]):
            # the next prompt = previous prompt + its answer + a new question
            assert cur["input_ids"][: len(prev["input_ids"])] == prev["input_ids"]
            assert len(cur["input_ids"]) == len(prev["input_ids"]) + prev["output_len"] + 4
    assert {r["tenant"] for r in recs} == {"tenant-0", "tenant-1"}
    trace = generate_trace(GenConfig(groups=8, prompts_per_group=50, zipf=2.0, system_len=16))
    hot = Counter(tuple(r["input_ids"][:16]) for r in trace)
    counts = sorted(hot.values(), reverse=True)
    assert counts[0] > 5 * counts[-1]
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        GenConfig(groups=0)


def test_replay_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = tmp_path / "gen.jsonl"
    assert main(["gen-trace", str(trace), "--groups", "3", "--prompts-per-group", "4", "--system-len", "64",
                 "--question-len", "8", "--output-len", "4", "--turns", "2", "--tenants", "2"]) == 0
    out_json, plots = tmp_path / "r.json", tmp_path / "plots"
    code = main(["replay", str(trace), "--capacity", "200", "1k", "unlimited", "--policy", "lru", "belady",
                 "--json", str(out_json), "--plot", str(plots), "--no-progress", "--window", "5"])
    assert code == 0
    text = capsys.readouterr().out
    assert "policy" in text and "hit rate by turn" in text and "same session" in text
    doc = json.loads(out_json.read_text())
    assert doc["trace"]["format"] == "tokens" and doc["trace"]["requests"] == 24
    runs = doc["runs"]
    assert [(r["policy"], r["capacity"]) for r in runs] == [
        ("lru", 200), ("lru", 1000), ("lru", None), ("belady", 200), ("belady", 1000), ("belady", None)]
    for r in runs:
        assert isinstance(r["token_hit_rate"], float) and 0.0 <= r["token_hit_rate"] <= 1.0
        assert set(r["groups"]) == {"tenant-0", "tenant-1"} and set(r["turns"]) == {"1", "2"}
        assert r["windows"] and "same_session_hit_tokens" in r["sessions"]
        if r["capacity"] is None:
            # Every turn 2 hits its own question 1 (8 tokens, same session) and the system
            # prompt, whose cached copy came from the group's first session: the same
            # session for 3 of the 12 sessions, another one for the rest.
            assert r["sessions"]["same_session_hit_tokens"] == 12 * 8 + 3 * 64
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert runs[2]["hit_tokens"] == runs[5]["hit_tokens"] == unlimited_hits(records)
    for lru, belady in zip(runs[:3], runs[3:]):
        assert belady["hit_tokens"] >= lru["hit_tokens"]
    for name in ("replay_capacity.png", "replay_time.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_cli_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = tmp_path / "t.jsonl"
    good = json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]})
    trace.write_text(f"{good}\n{good[:-3]}\n{good}\n")
    assert main(["replay", str(trace), "--no-progress"]) == 2
    assert "t.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["replay", str(trace), "--skip-bad", "--no-progress"]) == 0
    assert "1 malformed lines skipped" in capsys.readouterr().out


def test_parse_tokens_and_register() -> None:
    parsed = [parse_tokens(t) for t in ("4096", "512k", "1.5M", "2G", "unlimited")]
    assert parsed == [4096, 512_000, 1_500_000, 2 * 10**9, None]
    for bad in ("0", "abc", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_tokens(bad)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", "t.jsonl", "--capacity", "1M", "unlimited", "--policy", "lru", "fifo"])
    assert args.capacity == [1_000_000, None] and args.policy == ["lru", "fifo"] and callable(args.func)
