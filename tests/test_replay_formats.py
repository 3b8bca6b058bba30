"""Trace formats: detection, parsing, bad lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from radixserve.replay.formats import TraceFormatError, TraceReader


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


MOONCAKE = {"timestamp": 1500, "input_length": 1000, "output_length": 7, "hash_ids": [0, 1]}
BAILIAN = {"chat_id": 5, "parent_chat_id": -1, "timestamp": 2.5, "input_length": 40, "output_length": 3,
           "type": "text", "turn": 1, "hash_ids": [9, 8, 7]}
TOKENS = {"timestamp": 0.5, "input_ids": [3, 4, 5], "output_len": 2, "tenant": "acme", "session": 17}


@pytest.mark.parametrize(
    "record,fmt,block", [(MOONCAKE, "mooncake", 512), (BAILIAN, "bailian", 16), (TOKENS, "tokens", 1)]
)
def test_detects_format_from_first_line(tmp_path: Path, record: dict, fmt: str, block: int) -> None:
    reader = TraceReader(write(tmp_path / "t.jsonl", record))
    assert (reader.format, reader.block_size) == (fmt, block)
    (req,) = list(reader)
    assert req.index == 0 and req.line == 1


def test_mooncake_fields(tmp_path: Path) -> None:
    (req,) = TraceReader(write(tmp_path / "t.jsonl", MOONCAKE))
    assert req.timestamp == 1.5  # milliseconds in the file
    assert req.hash_ids == (0, 1) and req.input_length == 1000 and req.output_length == 7
    assert req.last_block_tokens == 1000 - 512
    assert req.session is None and req.tenant is None


def test_bailian_sessions_follow_parent_chat_ids(tmp_path: Path) -> None:
    turn2 = {**BAILIAN, "chat_id": 6, "parent_chat_id": 5, "turn": 2, "timestamp": 9.0}
    turn3 = {**BAILIAN, "chat_id": 8, "parent_chat_id": 6, "turn": 3, "type": "search"}
    orphan = {**BAILIAN, "chat_id": 11, "parent_chat_id": 3, "turn": 2}  # parent before the trace
    reqs = list(TraceReader(write(tmp_path / "t.jsonl", BAILIAN, turn2, turn3, orphan)))
    assert [r.session for r in reqs] == ["5", "5", "5", "3"]
    assert [r.turn for r in reqs] == [1, 2, 3, 2]
    assert [r.tenant for r in reqs] == ["text", "text", "search", "text"]
    assert reqs[1].timestamp == 9.0 and reqs[0].last_block_tokens == 40 - 32


def test_tokens_format(tmp_path: Path) -> None:
    prompt = {"timestamp": 1, "prompt": "hello world", "output_len": 4}
    path = write(tmp_path / "t.jsonl", TOKENS, prompt)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(TraceReader(path, skip_bad=True))  # a setup error, never skipped as a bad line
    reqs = list(TraceReader(path, tokenize=lambda s: [len(w) for w in s.split()]))
    assert reqs[0].input_ids == (3, 4, 5) and reqs[0].session == "17" and reqs[0].tenant == "acme"
    assert reqs[1].input_ids == (5, 5) and reqs[1].output_length == 4


def test_format_and_block_size_override(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", {**MOONCAKE, "input_length": 20, "hash_ids": [1, 2]})
    with pytest.raises(TraceFormatError, match="--block-size"):
        list(TraceReader(path))
    (req,) = TraceReader(path, fmt="mooncake", block_size=16)
    assert req.last_block_tokens == 4
    with pytest.raises(ValueError, match="format must be one of"):
        TraceReader(path, fmt="csv")


def test_bad_line_names_its_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", MOONCAKE, "", "{not json", MOONCAKE)
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:3: not valid JSON") as info:
        list(TraceReader(path))
    assert info.value.line == 3


@pytest.mark.parametrize("bad,message", [
    ({**MOONCAKE, "hash_ids": [0, 1, 2]}, "needs 2 blocks"),
    ({**MOONCAKE, "hash_ids": [0, -1]}, "integers >= 0"),
    ({**MOONCAKE, "hash_ids": [0, True]}, "integers >= 0"),
    ({**MOONCAKE, "input_length": "1000"}, "'input_length' must be an integer"),
    ({**MOONCAKE, "output_length": -1}, "'output_length' must be >= 0"),
    ({k: v for k, v in MOONCAKE.items() if k != "timestamp"}, "missing field 'timestamp'"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_requests(tmp_path: Path, bad: object, message: str) -> None:
    path = write(tmp_path / "t.jsonl", MOONCAKE, bad)
    with pytest.raises(TraceFormatError, match=rf":2: .*{message}"):
        list(TraceReader(path))


def test_skip_bad_counts_and_renumbers(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", "garbage", MOONCAKE, {**MOONCAKE, "hash_ids": []}, MOONCAKE)
    reader = TraceReader(path, skip_bad=True)  # detection skips the bad first line too
    reqs = list(reader)
    assert [(r.index, r.line) for r in reqs] == [(0, 2), (1, 4)]
    assert reader.skipped == 2 and reader.first_error.startswith("line 1:")
    with pytest.raises(TraceFormatError, match=":1: cannot tell the trace format"):
        TraceReader(write(tmp_path / "u.jsonl", {"foo": 1}))


def test_gzip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(TOKENS) + "\n")
    assert list(TraceReader(path))[0].input_ids == (3, 4, 5)
    with pytest.raises(ValueError, match="not found"):
        TraceReader(tmp_path / "nope.jsonl")
