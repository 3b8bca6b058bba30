"""`radixserve replay --replicas N --route R`: a cluster simulated with the router's own policies,
reported beside one cache of the cluster's total size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.replay.cli import main
from radixserve.replay.cluster import ClusterSpec, simulate_cluster
from radixserve.replay.formats import TraceReader
from radixserve.replay.gentrace import GenConfig, write_trace
from radixserve.replay.simulate import RunSpec, simulate

DATA = Path(__file__).parent / "data"
TRACES = [DATA / "conversation_trace_500.jsonl", DATA / "synthetic_trace_500.jsonl"]


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_cli_reports_the_cluster_beside_one_big_cache(trace, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["replay", str(trace), "--replicas", "4", "--capacity", "100k", "400k", "--route", "cache_aware",
            "round_robin", "least_load", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "replicas behind a router" in text and "one cache" in text
    doc = json.loads(out.read_text())
    # The main table holds one cache of 4 x each capacity: the single-cache figure.
    assert [(r["policy"], r["capacity"]) for r in doc["runs"]] == [("lru", 400_000), ("lru", 1_600_000)]
    requests = list(TraceReader(str(trace)))
    single = simulate(requests, [RunSpec("lru", 400_000), RunSpec("lru", 1_600_000)]).runs
    assert [r["hit_tokens"] for r in doc["runs"]] == [r["hit_tokens"] for r in single]
    rate = {(c["route"], c["capacity"]): c["token_hit_rate"] for c in doc["cluster"]}
    for capacity in (100_000, 400_000):
        assert rate[("cache_aware", capacity)] >= rate[("round_robin", capacity)]
        assert rate[("cache_aware", capacity)] >= rate[("least_load", capacity)]
    for c in doc["cluster"]:
        assert c["replicas"] == 4 and c["total_capacity"] == 4 * c["capacity"]
        assert sum(c["replica_requests"]) == c["requests"] == 500


@pytest.mark.parametrize("route", ["cache_aware", "round_robin", "least_load"])
def test_one_replica_is_one_cache(route):
    requests = list(TraceReader(str(TRACES[0])))
    for capacity in (50_000, 400_000, None):
        cluster = simulate_cluster(requests, [ClusterSpec(1, route, capacity)])[0]
        alone = simulate(requests, [RunSpec("lru", capacity)]).runs[0]
        assert (cluster["hit_tokens"], cluster["evicted_tokens"]) == (alone["hit_tokens"], alone["evicted_tokens"])


def test_round_robin_splits_the_trace_into_independent_caches():
    """Request i goes to replica i mod N: the cluster's hits are the hits of N separate caches, each
    replaying its share of the trace (counted here with the single-cache simulation)."""
    requests = list(TraceReader(str(TRACES[1])))
    n = 3
    for capacity in (100_000, None):
        cluster = simulate_cluster(requests, [ClusterSpec(n, "round_robin", capacity)])[0]
        shares = [simulate(requests[k::n], [RunSpec("lru", capacity)]).runs[0]["hit_tokens"] for k in range(n)]
        assert cluster["hit_tokens"] == sum(shares)
        assert cluster["replica_requests"] == [len(requests[k::n]) for k in range(n)]


def test_cache_aware_keeps_conversations_together(tmp_path):
    trace = tmp_path / "chat.jsonl"
    write_trace(GenConfig(groups=6, prompts_per_group=8, system_len=200, question_len=30, output_len=20, turns=4,
                          think_time=5.0, rate=4.0, seed=3), trace)
    requests = list(TraceReader(str(trace)))
    runs = simulate_cluster(requests, [ClusterSpec(4, r, 20_000) for r in ("cache_aware", "round_robin")])
    aware, rr = runs
    assert aware["token_hit_rate"] > rr["token_hit_rate"] + 0.1
    assert aware["decisions"].get("cache_match", 0) > len(requests) // 2


def test_bad_cluster_options(capsys):
    assert main(["replay", str(TRACES[0]), "--replicas", "0", "--no-progress"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert main(["replay", str(TRACES[0]), "--replicas", "2", "--policy", "belady", "--no-progress"]) == 2
    assert "online eviction policy" in capsys.readouterr().err
    assert main(["replay", str(TRACES[0]), "--route", "round_robin", "--decode-tps", "9", "--no-progress"]) == 2
    assert "--route, --decode-tps: cluster options need --replicas N" in capsys.readouterr().err
    assert main(["replay", str(TRACES[0]), "--replicas", "2", "--cache-threshold", "2", "--no-progress"]) == 2
    assert "cache_threshold must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="route must be one of"):
        ClusterSpec(2, "random")
    with pytest.raises(ValueError, match="replicas must be"):
        ClusterSpec(0, "round_robin")
