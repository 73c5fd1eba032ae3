import pytest

from nvfp4kit.config import load_preset
from nvfp4kit.plan.kv import kv_bytes_per_token


def test_26b_a4b_fp8_kv_per_token_matches_the_research_numbers():
    cfg = load_preset("gemma-4-26b-a4b")
    kv = kv_bytes_per_token(cfg, kv_dtype="fp8_e5m2")
    assert (kv.sliding, kv.full) == (102_400, 10_240)
    assert (kv.sliding_per_layer, kv.full_per_layer) == (4_096, 2_048)
    assert (kv.sliding_layers, kv.full_layers) == (25, 5)
    once = kv_bytes_per_token(cfg, kv_dtype="fp8_e4m3", k_eq_v_once=True)
    assert (once.sliding, once.full) == (102_400, 5_120)


def test_bf16_doubles_every_entry():
    cfg = load_preset("gemma-4-26b-a4b")
    fp8, bf16 = kv_bytes_per_token(cfg, kv_dtype="fp8_e5m2"), kv_bytes_per_token(cfg, kv_dtype="bf16")
    assert (bf16.sliding, bf16.full) == (2 * fp8.sliding, 2 * fp8.full)


def test_k_eq_v_once_changes_nothing_on_models_with_v_proj():
    cfg = load_preset("gemma-4-e4b")  # attention_k_eq_v is false
    both, once = kv_bytes_per_token(cfg), kv_bytes_per_token(cfg, k_eq_v_once=True)
    assert both == once.__class__(**{**once.__dict__, "k_eq_v_once": False})


def test_kv_shared_layers_store_nothing():
    cfg = load_preset("gemma-4-e2b")  # 35 layers, the last 20 reuse KV: 12 sliding + 3 full store it
    kv = kv_bytes_per_token(cfg, kv_dtype="bf16")
    assert (kv.sliding_layers, kv.full_layers) == (12, 3)
    assert kv.sliding == 12 * 2 * 1 * 256 * 2 and kv.full == 3 * 2 * 1 * 512 * 2


def test_sequence_bytes_caps_sliding_layers_at_the_window():
    kv = kv_bytes_per_token(load_preset("gemma-4-26b-a4b"))
    assert kv.sequence_bytes(100) == 100 * (10_240 + 102_400)
    assert kv.sequence_bytes(100_000) == 100_000 * 10_240 + 1024 * 102_400


def test_unknown_kv_dtype_is_named():
    with pytest.raises(ValueError, match="fp4"):
        kv_bytes_per_token(load_preset("gemma-4-26b-a4b"), kv_dtype="fp4")
