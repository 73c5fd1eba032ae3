"""Sizing a checkpoint from its safetensors headers: exact bytes, components, and agreement with the config."""

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.formats.components import component_of
from nvfp4kit.plan.checkpoint import weights_from_checkpoint
from nvfp4kit.plan.weights import TOWER_COMPONENTS, weights_from_config
from nvfp4kit.testing.tiny import random_weights, tiny_text_config, write_tiny_checkpoint


def _bytes_by_component(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, t in tensors.items():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_header_sizes_equal_the_tensor_bytes_byte_for_byte(
    tmp_path, tiny_moe_cfg, tiny_weights, shards, modelopt_layout, write_checkpoint
):
    tensors = modelopt_layout(tiny_weights)
    tensors["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"] = torch.zeros(
        8, 16, dtype=torch.bfloat16
    )
    tensors["model.embed_vision.embedding_projection.weight"] = torch.zeros(64, 8, dtype=torch.float32)
    write_checkpoint(tmp_path / "ckpt", tiny_moe_cfg, tensors, shards=shards)
    stored = weights_from_checkpoint(tmp_path / "ckpt")
    prefixed = {
        ("model.language_model." + k if not k.startswith("model.") else k): v for k, v in tensors.items()
    }
    assert stored.bytes_by_component == _bytes_by_component(prefixed)
    assert stored.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored.get("vision") == 8 * 16 * 2 + 64 * 8 * 4
    assert stored.text_bytes == stored.total_bytes - stored.get("vision")


@pytest.mark.parametrize("shape", ["moe", "dense", "e2b"])
def test_config_estimate_equals_the_bf16_checkpoint(tmp_path, shape):
    write_tiny_checkpoint(tmp_path / shape, shape=shape, multimodal=True)
    stored = weights_from_checkpoint(tmp_path / shape)
    estimate = weights_from_config(config_from_dict(tiny_text_config(shape)), recipe="bf16")
    assert stored.bytes_by_component == estimate.bytes_by_component
    assert stored.params_by_component == estimate.params_by_component
    assert set(stored.formats.values()) == {"bf16"}


@pytest.mark.parametrize("shape", ["moe", "e2b"])
def test_config_estimate_equals_a_modelopt_nvfp4_checkpoint(
    tmp_path, shape, modelopt_layout, write_checkpoint
):
    text_cfg = (
        tiny_text_config(shape, hidden_size_per_layer_input=16) if shape == "e2b" else tiny_text_config(shape)
    )
    write_checkpoint(tmp_path / "q", text_cfg, modelopt_layout(random_weights(text_cfg)))
    stored = weights_from_checkpoint(tmp_path / "q")
    estimate = weights_from_config(config_from_dict(text_cfg), recipe="all-nvfp4")
    assert stored.bytes_by_component == estimate.bytes_by_component
    assert stored.params_by_component == estimate.params_by_component
    assert stored.formats == estimate.formats


@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("model.language_model.layers.3.self_attn.q_proj.weight_scale_2", "attention"),
        ("model.language_model.layers.3.self_attn.k_norm.weight", "norms"),
        ("model.layers.0.post_feedforward_layernorm_1.weight", "norms"),
        ("model.language_model.layers.0.layer_scalar", "norms"),
        ("model.language_model.layers.0.experts.17.down_proj.weight", "experts"),
        ("model.language_model.layers.0.experts.gate_up_proj", "experts"),
        ("model.language_model.layers.0.router.per_expert_scale", "router"),
        ("model.language_model.layers.0.mlp.down_proj.input_scale", "dense_mlp"),
        ("model.language_model.embed_tokens_per_layer.weight", "per_layer_embeddings"),
        ("model.language_model.per_layer_projection_norm.weight", "norms"),
        ("model.language_model.layers.2.per_layer_projection.weight", "per_layer_projections"),
        ("model.embed_tokens.weight", "embeddings"),
        ("lm_head.weight", "lm_head"),
        ("model.vision_tower.encoder.layers.0.mlp.down_proj.linear.weight", "vision"),
        ("model.embed_audio.embedding_projection.weight", "audio"),
        ("model.mtp.something", "other"),
    ],
)
def test_tensor_names_map_to_components(name, component):
    assert component_of(name) == component
    assert component not in TOWER_COMPONENTS or "tower" in name or "embed_" in name


def test_truncated_shard_is_reported_by_name(tmp_path, tiny_moe_cfg, tiny_weights, write_checkpoint):
    folder = write_checkpoint(tmp_path / "c", tiny_moe_cfg, tiny_weights)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="past the end"):
        weights_from_checkpoint(folder)


def test_garbage_file_and_missing_shards_are_clear_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        weights_from_checkpoint(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"x": "model-1.safetensors"}}'
    )
    with pytest.raises(ValueError, match="missing"):
        weights_from_checkpoint(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors"):
        weights_from_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        weights_from_checkpoint(tmp_path / "nowhere")
