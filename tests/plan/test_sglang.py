"""The seed card's SGLang table, reproduced from SGLang's formula, and why 0.90 vs 0.91 cannot explain it."""

import pytest

from nvfp4kit.config import load_preset
from nvfp4kit.plan.gpus import DEFAULT_PRELOAD_USED, find_gpu
from nvfp4kit.plan.sglang import sglang_pools_for, tokens_per_fraction_step
from nvfp4kit.plan.units import GiB

CARD_ALL_NVFP4 = int(17.81 * GiB)  # SGLang reports GiB ("GB") in its logs
CARD_NVIDIA = int(20.07 * GiB)


def pools(weights, fraction=0.91, ratio=0.05):
    free = find_gpu("RTX 3090").memory_bytes - DEFAULT_PRELOAD_USED
    return sglang_pools_for(
        load_preset("gemma-4-26b-a4b"), weights_bytes=weights, pre_load_free_bytes=free,
        kv_dtype="fp8_e5m2", mem_fraction_static=fraction, swa_full_tokens_ratio=ratio,
    )  # fmt: skip


def test_card_row_all_nvfp4_232k_full_11_6k_swa_in_3_33_gib():
    p = pools(CARD_ALL_NVFP4)
    assert p.full_tokens == pytest.approx(232_000, rel=0.02)
    assert p.swa_tokens == pytest.approx(11_600, rel=0.02)
    assert p.kv_bytes / GiB == pytest.approx(3.33, rel=0.02)
    assert p.fits


def test_card_row_nvidia_checkpoint_74k_full_3_7k_swa():
    p = pools(CARD_NVIDIA)
    assert p.full_tokens == pytest.approx(74_000, rel=0.02)
    assert p.swa_tokens == pytest.approx(3_700, rel=0.02)


def test_fraction_step_of_0_01_is_worth_only_about_16k_tokens():
    # 0.90 -> 0.91 moves 0.01 x pre-load free memory (~0.23 GiB) into KV: ~16K full tokens, not 158K
    p91, p90 = pools(CARD_ALL_NVFP4, 0.91), pools(CARD_ALL_NVFP4, 0.90)
    assert p91.full_tokens - p90.full_tokens == pytest.approx(tokens_per_fraction_step(p91), abs=2)
    assert 15_000 < tokens_per_fraction_step(p91) < 17_500
    # the same checkpoint at 0.90 still holds ~216K, nowhere near 74K
    assert p90.full_tokens == pytest.approx(216_500, rel=0.01)
    # and the NVIDIA checkpoint at 0.90 would hold ~58K, not 74K
    assert pools(CARD_NVIDIA, 0.90).full_tokens == pytest.approx(58_500, rel=0.01)


def test_weight_bytes_saved_go_one_to_one_into_kv():
    a, b = pools(CARD_ALL_NVFP4), pools(CARD_NVIDIA)
    assert a.kv_bytes - b.kv_bytes == CARD_NVIDIA - CARD_ALL_NVFP4
    assert a.full_tokens / b.full_tokens > 3  # 2.26 GiB on top of a ~1.07 GiB base


def test_sglang_refuses_when_the_swa_pool_cannot_hold_a_window():
    p = pools(CARD_NVIDIA, 0.87)
    assert not p.fits and p.requests_at(1000) == 0


def test_default_ratio_shrinks_the_full_pool_six_fold():
    # the card: "--swa-full-tokens-ratio 0.05 expands the full-attention KV pool 6x vs default"
    assert pools(CARD_ALL_NVFP4).full_tokens / pools(CARD_ALL_NVFP4, ratio=0.8).full_tokens == pytest.approx(
        6, rel=0.01
    )


def test_bad_fraction_is_rejected():
    with pytest.raises(ValueError, match="mem-fraction-static"):
        pools(CARD_ALL_NVFP4, 1.5)
