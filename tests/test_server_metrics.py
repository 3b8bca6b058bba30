"""/metrics on a real server, parsed with prometheus_client's own parser: names, labels, and that
each series moves by what the requests did."""

from __future__ import annotations

import pytest
from helpers.server import engine, http, leak_check, server  # noqa: F401 (fixtures)

from radixserve.server import BackgroundServer, ServerConfig
from radixserve.server.metrics import ENGINE_METRICS, PREFIX, Scrape, parse_metrics, token_buckets

M = "smollm2-135m-instruct"


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    status, got_headers, text = http(url + "/metrics", headers=headers)
    assert status == 200, text
    assert got_headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(text)


def _complete(server, prompt: str, **fields) -> dict:
    body = {"model": M, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **fields}
    status, _, answer = http(server.url + "/v1/completions", "POST", body)
    assert status == 200, answer
    return answer


def test_metrics_move_after_a_cached_request(server, engine):
    before = scrape(server.url)
    usages = [_complete(server, "A shared prompt about caching things.")["usage"] for _ in range(2)]
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    prompt = usages[0]["prompt_tokens"]
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached == prompt - 1
    assert delta("radixserve_prefix_cache_queried_tokens_total") == 2 * prompt
    assert delta("radixserve_prefix_cache_hit_tokens_total") == cached
    assert delta("radixserve_usage_cached_tokens_total") == cached
    assert delta("radixserve_usage_prompt_tokens_total") == 2 * prompt
    assert delta("radixserve_usage_completion_tokens_total") == 8
    assert delta("radixserve_generation_tokens_total") == 8
    assert delta("radixserve_time_to_first_token_seconds_count") == 2
    assert delta("radixserve_e2e_request_latency_seconds_count") == 2
    assert 1 <= delta("radixserve_inter_token_latency_seconds_count") <= 6
    assert delta("radixserve_request_success_total", finished_reason="length") == 2
    assert delta("radixserve_request_prompt_tokens_sum") == 2 * prompt
    assert delta("radixserve_request_generation_tokens_sum") == 8
    # A prompt of `prompt` tokens lands in the first bucket at or above it.
    bound = next(b for b in token_buckets(server.state.context_limit) if b >= prompt)
    assert delta("radixserve_request_prompt_tokens_bucket", le=f"{float(bound)}") == 2
    assert delta("radixserve_http_requests_total", method="POST", route="/v1/completions", status="200") == 2
    assert after.get("radixserve_num_requests_running") == after.get("radixserve_num_requests_waiting") == 0
    assert 0 < after.get("radixserve_kv_cache_usage_ratio") < 1
    assert after.has("radixserve_prefix_cache_evicted_tokens_total")
    stats = engine.stats()  # folding metrics appear exactly when the engine reports them
    assert after.has("radixserve_folded_tokens_total") == ("folded_tokens" in stats)
    assert after.has("radixserve_fold_ratio") == ("fold_ratio" in stats)
    assert after.get("radixserve_attention_kernel_compiles_total") == stats["attention_compiles"] == 0  # CPU: none
    # Two requests of 4 tokens: a prefill step and up to 3 decode steps each; no graphs on the CPU.
    assert 2 <= delta("radixserve_engine_steps_total") <= 8
    assert after.get("radixserve_engine_steps_total") == stats["steps"]
    assert after.get("radixserve_decode_graph_steps_total") == after.get("radixserve_piecewise_graph_steps_total") == 0
    assert after.get("radixserve_engine_failed_steps_total") == stats["failed_steps"] == 0


def test_every_engine_metric_has_the_model_name_and_the_process_collectors_are_there(server, engine):
    got = scrape(server.url)
    stats = engine.stats()
    for key, name, kind, _ in ENGINE_METRICS:
        if key not in stats:
            continue
        series = PREFIX + name + ("_total" if kind == "counter" else "")
        assert got.get(series, model_name=server.state.model_name) == pytest.approx(float(stats[key])), series
        assert [ls for n, ls, _ in got.samples if n == series] == [(("model_name", M),)], series
    for name in ("radixserve_time_to_first_token_seconds_count", "radixserve_pending_requests",
                 "radixserve_http_inflight_requests", "radixserve_request_errors_total"):
        assert [ls for n, ls, _ in got.samples if n == name] == [(("model_name", M),)], name
    assert got.has("process_resident_memory_bytes") and got.has("python_info")
    # Prometheus naming: counters end in _total, durations in _seconds.
    for name in got.names():
        if name.startswith(PREFIX) and "seconds" in name:
            assert name.split("seconds")[1] in ("_bucket", "_count", "_sum", "_created"), name


def test_the_text_format_whatever_the_accept_header(server):
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert scrape(server.url, headers={"Accept": accept}).has("radixserve_prompt_tokens_total")


def test_two_servers_in_one_process_keep_their_own_series(engine, server):
    """No global registry: a second server starts (no duplicate-series error) and counts only its own."""
    with BackgroundServer(engine, ServerConfig(port=0, served_model_name="other", api_key="k")) as other:
        before = scrape(server.url)
        body = {"model": "other", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
        status, _, answer = http(other.url + "/v1/completions", "POST", body, headers={"Authorization": "Bearer k"})
        assert status == 200, answer
        mine = scrape(other.url, headers={"Authorization": "Bearer k"})
        theirs = scrape(server.url)
        assert http(other.url + "/metrics")[0] == 401  # the API key rules hold for /metrics
    assert mine.get("radixserve_request_success_total", model_name="other") == 1
    assert mine.get("radixserve_http_requests_total", route="/v1/completions") == 1
    assert mine.get("radixserve_prompt_tokens_total", model_name="other") > 0  # the shared engine's counters
    assert theirs.get("radixserve_request_success_total") == before.get("radixserve_request_success_total")
    assert {dict(ls).get("model_name") for n, ls, _ in mine.samples if n.startswith(PREFIX)} <= {"other", None}


def test_token_buckets_are_one_two_five():
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_buckets(8192)[-1] == 5000
