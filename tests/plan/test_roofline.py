import pytest

from nvfp4kit.config import load_preset
from nvfp4kit.plan.gpus import find_gpu
from nvfp4kit.plan.kv import kv_bytes_per_token
from nvfp4kit.plan.roofline import decode_step, expected_distinct_experts
from nvfp4kit.plan.weights import weights_from_config


def step(recipe="all-nvfp4", batch=1, context=0, kv_dtype="bf16", gpu="h100"):
    cfg = load_preset("gemma-4-26b-a4b")
    kv = kv_bytes_per_token(cfg, kv_dtype=kv_dtype)
    return decode_step(
        cfg, weights_from_config(cfg, recipe=recipe), kv, batch=batch, context=context,
        bandwidth_bytes_per_s=find_gpu(gpu).bandwidth_bytes_per_s,
    )  # fmt: skip


def test_distinct_experts_grow_with_batch_as_in_the_anchors_table():
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert [round(expected_distinct_experts(128, 8, b)) for b in (4, 8, 16, 32, 64)] == [29, 52, 82, 112, 126]


def test_batch_1_bytes_match_the_anchor_scenarios():
    # anchors.md 5: A (all linears NVFP4, BF16 tied lm_head) 3.226 GB/step, B (attention BF16) 4.822 GB/step
    a, b = step("all-nvfp4"), step("attention-bf16")
    assert a.bytes_per_step / 1e9 == pytest.approx(3.226, rel=0.003)
    assert b.bytes_per_step / 1e9 == pytest.approx(4.822, rel=0.003)
    assert a.bytes_by_part["lm_head"] / a.bytes_per_step == pytest.approx(0.46, abs=0.01)
    assert a.tokens_per_s == pytest.approx(1_038, rel=0.01)  # H100 SXM 3.35 TB/s
    assert step(gpu="rtx 3090").tokens_per_s == pytest.approx(290, rel=0.01)


def test_kv_reads_are_added_per_sequence():
    # anchors: BF16 KV at 1k context costs 231 MB per sequence (200 KB/token sliding, 20 KB/token global)
    s = step(context=1024)
    assert s.bytes_by_part["kv_cache"] / 1e6 == pytest.approx(231, rel=0.01)
    assert step(batch=8, context=1024).bytes_by_part["kv_cache"] == 8 * s.bytes_by_part["kv_cache"]


def test_batching_raises_aggregate_but_lowers_per_request_speed():
    one, eight = step(batch=1, context=1024), step(batch=8, context=1024)
    assert eight.tokens_per_s > 2 * one.tokens_per_s
    assert eight.tokens_per_s_per_request < one.tokens_per_s_per_request
    assert eight.bytes_by_part["experts"] == pytest.approx(one.bytes_by_part["experts"] * 51.6 / 8, rel=0.002)


def test_bad_batch_is_rejected():
    with pytest.raises(ValueError, match="batch"):
        step(batch=0)
