import pytest

from nvfp4kit.config import load_preset
from nvfp4kit.plan.units import GiB
from nvfp4kit.plan.weights import RECIPES, nvfp4_linear_bytes, weights_from_config


def test_one_nvfp4_linear_is_packed_plus_block_scales_plus_two_scalars():
    assert nvfp4_linear_bytes(2816, 4096) == 2816 * 4096 // 2 + 2816 * 4096 // 16 + 8
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_linear_bytes(64, 40)


def test_recipes_only_change_the_components_they_quantize():
    cfg = load_preset("gemma-4-26b-a4b")
    full, bf16 = weights_from_config(cfg, recipe="all-nvfp4"), weights_from_config(cfg, recipe="bf16")
    for comp in ("embeddings", "router", "norms"):
        assert full.get(comp) == bf16.get(comp)
        assert full.formats[comp] == "bf16"
    assert full.formats["attention"] == "nvfp4"
    assert weights_from_config(cfg, recipe="attention-bf16").formats["attention"] == "bf16"
    assert weights_from_config(cfg, recipe="experts-only").formats["dense_mlp"] == "bf16"
    # NVFP4 is 0.5625 B/param (+8 B per linear) against BF16's 2
    assert full.get("experts") / bf16.get("experts") == pytest.approx(0.5625 / 2, rel=1e-4)


def test_attention_and_dense_mlp_in_nvfp4_save_about_what_the_card_reports():
    # card: nvidia checkpoint (attention + MLP BF16) 20.07 GB vs all-linear NVFP4 17.81 GB -> 2.26 apart
    cfg = load_preset("gemma-4-26b-a4b")
    saved = weights_from_config(cfg, recipe="experts-only").text_bytes - weights_from_config(cfg).text_bytes
    assert saved / GiB == pytest.approx(2.20, abs=0.01)
    assert saved / GiB == pytest.approx(2.26, rel=0.03)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="all-nvfp4"):
        weights_from_config(load_preset("gemma-4-31b"), recipe="int4")
    assert set(RECIPES) == {"all-nvfp4", "attention-bf16", "experts-only", "bf16"}


def test_e2b_ple_tables_stay_bf16_and_dominate():
    w = weights_from_config(load_preset("gemma-4-e2b"))
    assert w.formats["per_layer_embeddings"] == "bf16" and w.formats["per_layer_projections"] == "nvfp4"
    assert w.get("per_layer_embeddings") == 262_144 * 35 * 256 * 2
    assert w.get("per_layer_embeddings") > w.text_bytes / 2
