"""ModelOpt format pieces checked against ModelOpt 0.47's own functions, and the reader's refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.formats.modelopt import (
    config_json_quantization,
    hf_quant_config,
    linear_tensors,
    read_modelopt_algo,
    summarize_exclude_modules,
)
from nvfp4kit.formats.nvfp4 import quantize
from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.model.loader import load_model

NAME_SETS = [
    # text-only MoE: lm_head and routers BF16
    (
        ["lm_head"] + [f"model.layers.{i}.router.proj" for i in range(12)],
        [
            f"model.layers.{i}.{m}"
            for i in range(12)
            for m in ("self_attn.q_proj", "mlp.down_proj", "experts")
        ],
    ),
    # multimodal, attention kept BF16, one whole layer excluded (layer 1 vs layers 10/11 share a prefix)
    (
        ["lm_head", "model.vision_tower.encoder.layers.0.mlp.fc1", "model.embed_vision.embedding_projection"]
        + [f"model.language_model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "o_proj")]
        + ["model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.1.experts"],
        [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(12) if i != 1]
        + [f"model.language_model.layers.{i}.experts" for i in range(12) if i != 1],
    ),
    # a name that is a prefix of a quantized one needs the exact form
    (["model.layers.0.mlp"], ["model.layers.0.mlp_extra.up"]),
]


@pytest.mark.parametrize("unquantized,quantized", NAME_SETS)
def test_exclude_summary_equals_modelopt(unquantized, quantized):
    from modelopt.torch.export import quant_utils

    expected = sorted(quant_utils._prefix_wildcard_summarize_exclude_modules(unquantized, quantized))
    assert summarize_exclude_modules(unquantized, quantized) == expected


def test_quant_configs_equal_modelopt():
    from modelopt.torch.export import convert_hf_config as convert

    for weight_only in (False, True):
        doc = hf_quant_config(["lm_head", "model.layers.0.router*"], weight_only=weight_only)
        assert config_json_quantization(doc) == convert.convert_hf_quant_config_format(doc)
    doc = hf_quant_config(["lm_head"])
    assert json.dumps(doc) == (
        '{"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": {"quant_algo": "NVFP4", '
        '"kv_cache_quant_algo": null, "group_size": 16, "exclude_modules": ["lm_head"]}}'
    )


def test_linear_tensors_names_dtypes_shapes():
    q = quantize(torch.randn(32, 64).bfloat16())
    out = linear_tensors("model.layers.0.mlp.up_proj", q, input_scale=torch.tensor([0.5]))
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in out.items()}
    assert shapes == {
        "model.layers.0.mlp.up_proj.weight": (torch.uint8, (32, 32)),
        "model.layers.0.mlp.up_proj.weight_scale": (torch.float8_e4m3fn, (32, 4)),
        "model.layers.0.mlp.up_proj.weight_scale_2": (torch.float32, ()),
        "model.layers.0.mlp.up_proj.input_scale": (torch.float32, ()),
    }


def test_algo_detection(tmp_path):
    assert (
        read_modelopt_algo(
            tmp_path, {"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}
        )
        == "NVFP4"
    )
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config([], weight_only=True)))
    assert read_modelopt_algo(tmp_path, {}) == "W4A16_NVFP4"
    with pytest.raises(CheckpointError, match="quant_algo 'FP8' is not supported"):
        read_modelopt_algo(
            tmp_path, {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}
        )
    mixed = {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": {"a": {"quant_algo": "FP8"}},
    }
    with pytest.raises(CheckpointError, match=r"mixed-precision checkpoint uses \['FP8'\]"):
        read_modelopt_algo(tmp_path, {"quantization_config": mixed})


@pytest.fixture
def broken_copy(tmp_path):
    def make(src, change):
        folder = tmp_path / "broken"
        shutil.copytree(src, folder)
        weights = load_file(folder / "model.safetensors")
        change(weights)
        save_file(weights, folder / "model.safetensors")
        return folder

    return make


def test_unshared_gate_up_scales_are_refused(quantized_tiny, broken_copy):
    def change(w):
        w["model.layers.2.mlp.up_proj.weight_scale_2"] = w["model.layers.2.mlp.up_proj.weight_scale_2"] * 2

    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.up_proj.weight_scale_2 differs from"):
        load_model(broken_copy(quantized_tiny, change))


def test_expert_gate_up_scales_must_match(quantized_tiny, broken_copy):
    def change(w):
        w["model.layers.0.experts.3.gate_proj.weight_scale_2"] = torch.tensor(1.0)

    with pytest.raises(
        CheckpointError, match=r"experts.3.up_proj.weight_scale_2 differs from .*experts.3.gate_proj"
    ):
        load_model(broken_copy(quantized_tiny, change))


def test_packed_weight_without_scale_is_refused(quantized_tiny, broken_copy):
    def change(w):
        del w["model.layers.1.self_attn.o_proj.weight_scale"]

    with pytest.raises(CheckpointError, match=r"o_proj.weight is U8 but has no weight_scale"):
        load_model(broken_copy(quantized_tiny, change))


def test_mis_shaped_scale_is_refused(quantized_tiny, broken_copy):
    def change(w):
        w["model.layers.1.self_attn.o_proj.weight_scale"] = w["model.layers.1.self_attn.o_proj.weight_scale"][
            :, :2
        ].contiguous()

    with pytest.raises(
        CheckpointError, match=r"o_proj: weight \(64, 32\) and weight_scale \(64, 2\) do not match"
    ):
        load_model(broken_copy(quantized_tiny, change))
