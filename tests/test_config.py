"""Reading Gemma 4 configs in both on-disk forms, and refusing what we cannot run."""

import pytest

from nvfp4kit.config import ConfigError, config_from_dict
from nvfp4kit.testing.tiny import tiny_text_config


def test_old_and_per_layer_config_forms_agree():
    old = tiny_text_config("moe")
    new = dict(old)
    new.pop("global_head_dim")
    new.pop("num_global_key_value_heads")
    new["per_layer_config"] = {"5": {"head_dim": 32, "num_key_value_heads": 1}}
    assert config_from_dict(old) == config_from_dict(new)
    cfg = config_from_dict(new)
    assert (cfg.layer_head_dim(0), cfg.layer_kv_heads(0)) == (16, 2)
    assert (cfg.layer_head_dim(5), cfg.layer_kv_heads(5)) == (32, 1)
    assert not cfg.layer_has_v_proj(5) and cfg.layer_has_v_proj(0)


def test_global_kv_heads_apply_only_with_k_eq_v():
    # transformers applies num_global_key_value_heads only to k_eq_v models
    raw = tiny_text_config("dense", num_global_key_value_heads=1)
    assert config_from_dict(raw).layer_kv_heads(5) == 2


def test_multimodal_form_reads_text_config_and_prefix():
    raw = {"model_type": "gemma4", "text_config": tiny_text_config("moe"), "vision_config": {}}
    cfg = config_from_dict(raw, generation_config={"eos_token_id": [1, 106, 50]})
    assert cfg.weight_prefix == "model.language_model."
    assert cfg.eos_token_ids == (1, 106, 50)


def test_kv_sharing_reads_the_last_earlier_layer_of_the_same_type():
    cfg = config_from_dict(tiny_text_config("e2b"))
    assert [cfg.kv_source_layer(i) for i in range(7)] == [0, 1, 2, 3, 3, 3, 2]
    assert cfg.layer_intermediate_size(5) == 96 and cfg.layer_intermediate_size(2) == 48


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "not a Gemma 4 checkpoint"),
        ({"hidden_activation": "silu"}, "unsupported hidden_activation 'silu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"layer_types": ["chunked"] + ["sliding_attention"] * 5}, "unsupported layer_types"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}, "unsupported rope_type 'yarn'"),
        ({"top_k_experts": 9}, "top_k_experts"),
    ],
)
def test_unsupported_values_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**tiny_text_config("moe"), **change})
