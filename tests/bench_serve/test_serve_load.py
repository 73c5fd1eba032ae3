"""`nvfp4kit bench serve` on the CPU: its statistics, its workload, and runs against the built-in demo model
(one server for the module, tiny numbers) and against a server it starts on random weights."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from nvfp4kit.bench.serve_load import check_loopback, corpus_text, load_levels, parse_counters, sample_lengths
from nvfp4kit.bench.serve_load_server import ServerOptions, serve_command, started_server
from nvfp4kit.bench.serve_load_stats import (
    RequestResult,
    format_row,
    percentile,
    steps_by_kind,
    summarize,
    ttft_parts,
)
from nvfp4kit.cli import main


def test_percentiles_match_numpy():
    values = [random.Random(1).uniform(0, 5) for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_lengths_stay_in_the_range_and_repeat_with_the_seed():
    lengths = sample_lengths(random.Random(3), 100, 0.5, 500)
    assert min(lengths) >= 50 and max(lengths) <= 150 and 90 < sum(lengths) / 500 < 110
    assert lengths == sample_lengths(random.Random(3), 100, 0.5, 500)
    assert sample_lengths(random.Random(0), 7, 0.0, 3) == [7, 7, 7]
    assert min(sample_lengths(random.Random(0), 1, 1.0, 50)) == 1


def test_only_loopback_urls():
    assert check_loopback("http://127.0.0.1:30000/") == "http://127.0.0.1:30000"
    assert check_loopback("http://localhost:8000") == "http://localhost:8000"
    assert check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    for url in ("http://10.0.0.1:30000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:30000"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(url)


def test_levels_and_corpus():
    args = lambda c, r: type("A", (), {"concurrency": c, "request_rate": r})  # noqa: E731
    assert load_levels(args(None, None)) == [(1, math.inf)]
    assert load_levels(args([1, 8], None)) == [(1, math.inf), (8, math.inf)]
    assert load_levels(args(None, [2.0])) == [(None, 2.0)]
    assert load_levels(args([4], [1.0, 2.0])) == [(4, 1.0), (4, 2.0)]
    text = corpus_text()
    assert len(text) > 100_000 and "<|turn>" not in text and "<turn|>" not in text


def test_summary_of_known_requests():
    results = [
        RequestResult(
            turn=0, ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4
        ),
        RequestResult(
            turn=1, ok=True, prompt_tokens=30, output_tokens=3, ttft=0.3, latency=0.5, itl=[0.1] * 2
        ),
        RequestResult(turn=1, error="HTTP 500: boom"),
    ]
    row = summarize(results, duration=2.0)
    assert (row["requests"], row["completed"], row["failed"]) == (3, 2, 1)
    assert row["request_throughput"] == 1.0 and row["output_tokens_per_s"] == 4.0
    assert row["input_tokens_per_s"] == 20.0
    assert row["ttft_ms_mean"] == 200.0 and row["tpot_ms_mean"] == 100.0 and row["itl_ms_p50"] == 100.0
    assert row["ttft_ms_mean_by_turn"] == [100.0, 300.0] and row["input_tokens_mean_by_turn"] == [10, 30]
    assert row["cached_tokens_mean_by_turn"] is None and row["errors"] == ["HTTP 500: boom"]


def test_token_counters_from_metrics():
    page = (
        "# TYPE nvfp4kit_prompt_tokens_total counter\nnvfp4kit_prompt_tokens_total 42\n"
        'x_prefill_tokens_total{kind="a"} 3\nx_prefill_tokens_total{kind="b"} 4.5\nnvfp4kit_num_requests_running 2\n'
    )
    assert parse_counters(page) == {"nvfp4kit_prompt_tokens_total": 42.0, "x_prefill_tokens_total": 7.5}


def test_step_counters_give_the_mean_step_time_by_kind():
    """Session 8's finding, read from a level's counters: steps that prefill beside the decodes cost ~8x one
    decode step (the H200's c100: 214 x 119 ms against 2,167 x 15 ms)."""
    page = (
        'nvfp4kit_engine_steps_total{kind="decode_graph"} 2167\nnvfp4kit_engine_steps_total{kind="prefill"} 214\n'
        'nvfp4kit_engine_steps_total{kind="decode_eager"} 0\n'
        'nvfp4kit_engine_step_seconds_total{kind="decode_graph"} 32.9\n'
        'nvfp4kit_engine_step_seconds_total{kind="prefill"} 25.4\nnvfp4kit_prompt_tokens_total 9\n'
        'nvfp4kit_engine_step_device_seconds_total{kind="decode_graph"} 28.1\n'
        'nvfp4kit_engine_step_device_seconds_total{kind="decode_eager"} 0.0\n'
    )
    counters = parse_counters(page)
    assert counters['nvfp4kit_engine_steps_total{kind="prefill"}'] == 214.0
    assert counters["nvfp4kit_prompt_tokens_total"] == 9.0
    steps = steps_by_kind(counters)
    assert steps == {
        "decode_graph": {"steps": 2167.0, "mean_ms": 15.18, "device_ms": 12.97},
        "prefill": {"steps": 214.0, "mean_ms": 118.69},
    }
    row = {"concurrency": 100, "request_rate": None, "completed": 1, "requests": 1, "request_throughput": 1.0,
           "output_tokens_per_s": 1.0, "mean_input_tokens": 1, "mean_output_tokens": 1, "server_steps": steps}  # fmt: skip
    assert "engine steps: decode_graph 2167 x 15.2 ms (GPU 13.0), prefill 214 x 118.7 ms" in format_row(row)


def test_server_ttft_parts_from_the_histograms():
    """A level's mean server TTFT and its parts come from the histogram sums and counts the level added."""
    page = (
        'nvfp4kit_time_to_first_token_seconds_bucket{le="0.1"} 4\nnvfp4kit_time_to_first_token_seconds_sum 0.332\n'
        "nvfp4kit_time_to_first_token_seconds_count 4\nnvfp4kit_request_preprocess_seconds_sum 0.012\n"
        "nvfp4kit_request_preprocess_seconds_count 4\nnvfp4kit_request_engine_first_token_seconds_sum 0.3\n"
        "nvfp4kit_request_engine_first_token_seconds_count 4\n"
    )
    counters = parse_counters(page)
    assert "nvfp4kit_time_to_first_token_seconds_bucket" not in counters
    parts = ttft_parts(counters)
    assert parts == {"server": 83.0, "preprocess": 3.0, "engine": 75.0}
    row = {"concurrency": 1, "request_rate": None, "completed": 4, "requests": 4, "request_throughput": 1.0,
           "output_tokens_per_s": 1.0, "mean_input_tokens": 1, "mean_output_tokens": 1, "server_ttft_ms": parts}  # fmt: skip
    assert "server TTFT ms mean: server 83.0, preprocess 3.0, engine 75.0" in format_row(row)
    assert ttft_parts({}) == {}


def test_the_started_server_command():
    command = serve_command(
        ServerOptions(random_weights="26b-a4b", device="cuda", extra="--kv-cache-dtype fp8_e5m2"), 123
    )
    assert command[1:] == ["-m", "nvfp4kit", "serve", "--random-weights", "26b-a4b", "--host", "127.0.0.1",
                           "--port", "123", "--device", "cuda", "--kv-cache-dtype", "fp8_e5m2"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with started_server(ServerOptions(timeout_s=120), log=lambda msg: None) as server:
        yield server.base_url


def bench(tmp_path, *options: str) -> dict:
    out = tmp_path / "rows.json"
    code = main(["bench", "serve", *options, "--warmup", "1", "--no-progress", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    return result


def test_concurrency_sweep_on_the_demo(demo_server, tmp_path):
    result = bench(tmp_path, "--base-url", demo_server, "--concurrency", "1", "2", "--num-prompts", "3",
                   "--input-len", "16", "--input-range", "0.5", "--output-len", "4")  # fmt: skip
    assert result["model"] == "nvfp4kit-demo" and result["server"] == "external"
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["scenario"] == "serve" and row["endpoint"] == "completions"
        assert (row["completed"], row["failed"]) == (3, 0)
        assert row["mean_output_tokens"] == 4  # ignore_eos: exactly max_tokens
        assert 8 <= row["mean_input_tokens"] <= 24  # token-id prompts of the sampled lengths
        assert row["ttft_ms_p50"] > 0 and row["tpot_ms_mean"] > 0 and row["itl_ms_p99"] >= row["itl_ms_p50"]
        assert row["output_tokens_per_s"] > 0 and row["request_throughput"] > 0
        counted = row["server_counters"]  # the server's own counts over the level, from /metrics
        assert counted["nvfp4kit_generation_tokens_total"] == 3 * 4
        assert counted["nvfp4kit_prompt_tokens_total"] == round(3 * row["mean_input_tokens"])


def test_multi_turn_chat_history_grows(demo_server, tmp_path):
    result = bench(tmp_path, "--base-url", demo_server, "--turns", "3", "--concurrency", "2", "--num-prompts",
                   "2", "--input-len", "12", "--output-len", "3", "--think-time", "0.3")  # fmt: skip
    assert result["workload"]["think_time"] == 0.3
    (row,) = result["rows"]
    assert row["duration_s"] >= 2 * 0.3  # each conversation paused before its second and third turns
    assert row["scenario"] == "serve_multiturn" and row["endpoint"] == "chat"
    assert (row["requests"], row["completed"]) == (6, 6)
    by_turn = row["input_tokens_mean_by_turn"]
    assert by_turn[0] >= 12 and by_turn[0] < by_turn[1] < by_turn[2]  # each turn re-sends the history
    assert len(row["ttft_ms_mean_by_turn"]) == 3


def test_poisson_request_rate_with_two_choices(demo_server, tmp_path):
    result = bench(tmp_path, "--base-url", demo_server, "--request-rate", "50", "--num-prompts", "3",
                   "--input-len", "8", "--output-len", "2", "--endpoint", "chat", "--n", "2")  # fmt: skip
    (row,) = result["rows"]
    assert row["concurrency"] is None and row["request_rate"] == 50 and row["completed"] == 3
    assert row["mean_output_tokens"] == 4  # both choices' tokens


def test_a_server_it_starts_on_random_weights(tmp_path):
    result = bench(tmp_path, "--random-weights", "tiny-moe", "--num-prompts", "2", "--input-len", "16",
                   "--output-len", "3", "--server-timeout", "120")  # fmt: skip
    assert result["model"] == "tiny-moe-random" and "--random-weights tiny-moe" in result["server"]
    assert result["rows"][0]["completed"] == 2 and result["rows"][0]["mean_output_tokens"] == 3


def test_remote_urls_are_refused(capsys):
    assert main(["bench", "serve", "--base-url", "http://192.0.2.1:30000", "--no-progress"]) != 0
    assert "loopback" in capsys.readouterr().err
