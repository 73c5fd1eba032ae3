"""The engine benchmark's CPU-checkable parts: timed runs on the tiny model, the roofline, the HF config, the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from nvfp4kit.bench import register_all
from nvfp4kit.bench.engine_runs import decode_roofline, decode_speed, end_batch, prefill_speed, start_batch
from nvfp4kit.bench.engine_speed import engine_config
from nvfp4kit.bench.hf_baseline import hf_text_config
from nvfp4kit.config import PRESET_DIR, load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.plan.weights import weights_from_config


def test_decode_and_prefill_runs_finish_their_requests(tiny_checkpoint):
    engine = Engine(load_model(tiny_checkpoint("moe")), None, config=EngineConfig(max_num_seqs=4))
    result = decode_speed(engine, batch=3, context=20, steps=4)
    assert result.batch == 3 and result.tokens_per_s > 0 and result.ms_per_step > 0
    assert not engine.has_unfinished() and len(engine.cache.free_blocks) == engine.layout.num_blocks
    prefill = prefill_speed(engine, prompt_len=40)
    assert prefill.tokens_per_s > 0 and prefill.ttft_ms > 0 and not engine.has_unfinished()


def test_a_timed_decode_batch_stays_whole_when_prefill_takes_many_steps(tiny_checkpoint):
    """Session 29: with a small step budget the first prompts decode while the later ones prefill; requests capped
    at the timed step count then ended early, and "batch 96" steps ran ~70 rows. Every step after `start_batch`
    decodes every request, for longer than the prefill took."""
    engine = Engine(
        load_model(tiny_checkpoint("moe")),
        None,
        config=EngineConfig(max_num_seqs=6, max_num_batched_tokens=64),
    )
    reqs = start_batch(engine, batch=6, context=40)
    assert max(len(r.output_ids) for r in reqs) >= 4  # the first prompts decoded through the later prefills
    for _ in range(6):
        assert {e.request_id for e in engine.step()} == {r.request_id for r in reqs}
    end_batch(engine, reqs)
    assert not engine.has_unfinished() and len(engine.cache.free_blocks) == engine.layout.num_blocks
    result = decode_speed(engine, batch=6, context=40, steps=5)  # checks the whole batch decoded each step
    assert result.batch == 6 and len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_a_decode_batch_larger_than_the_engine_runs_is_refused(tiny_checkpoint):
    """Session 8 on the H200: `bench engine --decode-batches 1` (engine of one sequence) reported the batch-16 sampled
    row at 4,643 tok/s: one sequence decoded, sixteen counted. The bench sizes the engine for every batch it runs."""
    engine = Engine(load_model(tiny_checkpoint("moe")), None, config=EngineConfig(max_num_seqs=2))
    with pytest.raises(ValueError, match="max_num_seqs=2"):
        decode_speed(engine, batch=3, context=8, steps=2)
    args = argparse.Namespace(
        prefill=[64],
        context=32,
        steps=4,
        decode_batches=[1],
        sampled_batches=[16],
        kv_dtype="bf16",
        chunk=None,
        max_model_len=None,
        eager=True,
    )
    assert engine_config(args, None).max_num_seqs == 16
    assert engine_config(args, None).prefill_graphs is None  # the card's default, as the server's


def test_bench_engine_takes_the_servers_prefill_graph_counts():
    """`bench engine --prefill-graphs 1024,1536` times the prefill steps with the graph set a server would use."""
    from nvfp4kit.bench.engine_speed import register_scenario

    parser = argparse.ArgumentParser()
    register_scenario(parser.add_subparsers(dest="cmd"))
    for flag, expected in (("1024,1536", (1024, 1536)), ("none", ())):
        args = parser.parse_args(["engine", "--prefill-graphs", flag])
        assert engine_config(args, None).prefill_graphs == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["engine", "--prefill-graphs", "0,x"])
    parallel = parser.parse_args(["engine", "--tensor-parallel-size", "2"])
    assert engine_config(parallel, None).prefill_graphs == ()  # the ranks replay no prefill graphs
    with pytest.raises(SystemExit, match="tensor-parallel"):
        engine_config(parser.parse_args(["engine", "-tp", "2", "--prefill-graphs", "1024"]), None)


def test_roofline_of_the_26b_shape_matches_the_issue_figure():
    cfg = load_preset("gemma-4-26b-a4b")
    step_bytes, tokens_per_s = decode_roofline(
        cfg,
        weights_from_config(cfg),
        batch=1,
        context=512,
        kv_dtype="fp8_e5m2",
        bandwidth_bytes_per_s=3.35e12,
    )
    assert 3.0e9 < step_bytes < 3.6e9  # BF16 lm_head 1.48 GB + attention/dense NVFP4 + 8 experts a layer
    assert 900 < tokens_per_s < 1100  # the issue quotes "about 930"
    _, batch16 = decode_roofline(
        cfg,
        weights_from_config(cfg),
        batch=16,
        context=512,
        kv_dtype="fp8_e5m2",
        bandwidth_bytes_per_s=3.35e12,
    )
    assert batch16 > 4 * tokens_per_s  # experts are shared across the batch


def test_hf_baseline_config_has_the_preset_shape():
    import transformers  # noqa: F401  (a test extra)

    raw = json.loads((PRESET_DIR / "gemma-4-26b-a4b.json").read_text())["config"]
    hf = hf_text_config(raw)
    ours = load_preset("gemma-4-26b-a4b")
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_experts, hf.top_k_experts) == (
        ours.hidden_size, ours.num_hidden_layers, ours.num_experts, ours.top_k_experts
    )  # fmt: skip
    assert hf.vocab_size == ours.vocab_size and hf.attention_k_eq_v == ours.attention_k_eq_v


def test_bench_cli_has_engine_and_capacity_scenarios():
    parser = argparse.ArgumentParser()
    register_all(parser.add_subparsers(dest="scenario"))
    args = parser.parse_args(["engine", "--decode-batches", "1", "16", "--baseline", "none"])
    assert args.decode_batches == [1, 16] and args.baseline == "none" and args.preset == "gemma-4-26b-a4b"
    args = parser.parse_args(["capacity", "--budget", "24GiB", "--context", "200000"])
    assert args.budget == "24GiB" and args.context == 200_000 and args.min_pool_tokens == 400_000
