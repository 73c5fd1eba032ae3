"""compressed-tensors `nvfp4-pack-quantized`: same bytes as ModelOpt under other names, inverted global scales."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model

CT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                        "symmetric": True, "dynamic": False, "scale_dtype": "float8_e4m3fn"},
            "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                  "symmetric": True, "dynamic": "local"},
            "format": "nvfp4-pack-quantized",
        }
    },
    "ignore": ["lm_head", "re:.*router.*"],
    "kv_cache_scheme": None,
}  # fmt: skip


def to_compressed_tensors(src, dst):
    """Rewrite a ModelOpt NVFP4 export the way compressed-tensors' own converter maps it."""
    shutil.copytree(src, dst)
    (dst / "hf_quant_config.json").unlink()
    weights = load_file(dst / "model.safetensors")
    out = {}
    for name, t in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and t.dtype == torch.uint8:
            out[f"{module}.weight_packed"] = t
        elif leaf == "weight_scale_2":
            out[f"{module}.weight_global_scale"] = (1.0 / t).reshape(1)
        elif leaf == "input_scale":
            out[f"{module}.input_global_scale"] = (1.0 / t).reshape(1)
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = CT_CONFIG
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def logits(model):
    ids = torch.arange(110, 140)
    with torch.no_grad():
        return model(ids, ContiguousKVCache(model.config).step(len(ids)))


def test_reads_ct_nvfp4_like_modelopt(quantized_tiny, tmp_path):
    ct = load_model(to_compressed_tensors(quantized_tiny, tmp_path / "ct"), dtype=torch.float32)
    mo = load_model(quantized_tiny, dtype=torch.float32)
    a, b = ct.layers[0].experts, mo.layers[0].experts
    assert torch.equal(a.gate_up_packed, b.gate_up_packed) and torch.equal(
        a.gate_up_scale.view(torch.uint8), b.gate_up_scale.view(torch.uint8)
    )
    # 1 / (1 / s) may land an ulp away from s
    torch.testing.assert_close(a.gate_up_scale_2, b.gate_up_scale_2, rtol=2.5e-7, atol=0)
    torch.testing.assert_close(logits(ct), logits(mo), rtol=0, atol=1e-4)


def test_other_ct_formats_are_refused(quantized_tiny, tmp_path):
    folder = to_compressed_tensors(quantized_tiny, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "pack-quantized"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"compressed-tensors format \['pack-quantized'\] is not supported"
    ):
        load_model(folder)


def test_non_positive_global_scale_is_refused(quantized_tiny, tmp_path):
    folder = to_compressed_tensors(quantized_tiny, tmp_path / "ct")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight_global_scale"] = torch.zeros(1)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight_global_scale is 0.0; expected > 0"):
        load_model(folder)
