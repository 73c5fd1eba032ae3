import json

import pytest

from nvfp4kit.config import PRESET_DIR, list_presets, load_preset
from nvfp4kit.plan.weights import parameter_counts

EXPECTED = {"gemma-4-e2b", "gemma-4-e4b", "gemma-4-12b", "gemma-4-26b-a4b", "gemma-4-31b"}


def test_all_five_presets_exist():
    assert EXPECTED <= set(list_presets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_loads_and_is_documented(name):
    cfg = load_preset(name)
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert raw["source"] and isinstance(raw["unconfirmed"], list)
    assert raw["config"]["model_type"] in ("gemma4", "gemma4_unified") and raw["config"]["text_config"]
    assert raw["generation_config"]["eos_token_id"] == [1, 106, 50]
    assert cfg.layer_types[-1] == "full_attention"
    # the text-tower count recorded from transformers' own modeling code equals ours (plus one layer_scalar
    # buffer per layer, which transformers counts as a buffer, not a parameter)
    towers = raw["tower_parameters"]
    assert parameter_counts(cfg).total == towers["text"] + cfg.num_hidden_layers
    assert towers["vision"] > 0


def test_26b_a4b_has_the_published_25_2b_total_and_3_8b_active():
    counts = parameter_counts(load_preset("gemma-4-26b-a4b"))
    assert round(counts.total / 1e9, 1) == 25.2
    assert round(counts.active / 1e9, 1) == 3.8
    assert round(counts.by_component["experts"] / 1e9, 2) == 22.84


@pytest.mark.parametrize(
    ("name", "published"),
    # HF's reported parameter counts of the whole checkpoints (text + towers + tensors the model does not use)
    [("gemma-4-e2b", 5_123_178_051), ("gemma-4-e4b", 7_996_156_490), ("gemma-4-12b", 11_959_730_224),
     ("gemma-4-31b", 31_273_088_876)],
)  # fmt: skip
def test_preset_towers_add_up_to_the_published_checkpoint_size(name, published):
    cfg = load_preset(name)
    towers = json.loads((PRESET_DIR / f"{name}.json").read_text())["tower_parameters"]
    total = parameter_counts(cfg).total + sum(v for k, v in towers.items() if k != "text")
    assert total == published


def test_small_models_have_their_distinctive_features():
    e2b, e4b = load_preset("gemma-4-e2b"), load_preset("gemma-4-e4b")
    assert (e2b.num_kv_shared_layers, e2b.use_double_wide_mlp, e2b.hidden_size_per_layer_input) == (
        20,
        True,
        256,
    )
    assert (e4b.num_kv_shared_layers, e4b.use_double_wide_mlp) == (18, False)
    assert load_preset("gemma-4-12b").num_global_key_value_heads == 1
    assert load_preset("gemma-4-31b").num_global_key_value_heads == 4
