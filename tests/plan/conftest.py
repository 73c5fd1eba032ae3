"""Helpers for the plan tests: tiny checkpoints in the BF16 (HF) and ModelOpt NVFP4 layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nvfp4kit.testing.tiny import random_weights, tiny_text_config

# Linears ModelOpt's all-linear recipe quantizes (routers, embeddings and norms stay BF16).
QUANTIZED_SUFFIXES = (
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
    "down_proj.weight", "per_layer_input_gate.weight", "per_layer_projection.weight",
    "per_layer_model_projection.weight",
)  # fmt: skip


def _nvfp4_tensors(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors ModelOpt exports for one linear (random content: only names, dtypes, shapes matter)."""
    n, k = w.shape
    base = name.removesuffix(".weight")
    return {
        base + ".weight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
        base + ".weight_scale": torch.rand(n, k // 16).to(torch.float8_e4m3fn),
        base + ".weight_scale_2": torch.tensor(0.01, dtype=torch.float32),
        base + ".input_scale": torch.tensor(0.02, dtype=torch.float32),
    }


def modelopt_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named BF16 weights -> ModelOpt's NVFP4 export layout: per-expert unfused projections."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name.endswith("experts.gate_up_proj"):
            base, inter = name.removesuffix("gate_up_proj"), w.shape[1] // 2
            for e in range(w.shape[0]):
                out |= _nvfp4_tensors(f"{base}{e}.gate_proj.weight", w[e, :inter])
                out |= _nvfp4_tensors(f"{base}{e}.up_proj.weight", w[e, inter:])
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(w.shape[0]):
                out |= _nvfp4_tensors(f"{base}{e}.down_proj.weight", w[e])
        elif name.endswith(QUANTIZED_SUFFIXES) and "router" not in name:
            out |= _nvfp4_tensors(name, w)
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def write_checkpoint(
    folder: Path, text_cfg: dict, tensors: dict[str, torch.Tensor], *, shards: int = 1
) -> Path:
    """config.json (multimodal form) + tensors under model.language_model., split into `shards` files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text_cfg,
    }
    (folder / "config.json").write_text(json.dumps(config))
    named = {
        ("model.language_model." + k if not k.startswith("model.") else k): v.contiguous()
        for k, v in tensors.items()
    }
    names = sorted(named)
    if shards == 1:
        save_file(named, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: named[k] for k in part}, str(folder / file))
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


@pytest.fixture
def tiny_moe_cfg() -> dict:
    # hidden/intermediate sizes multiple of 16 so every linear can be NVFP4
    return tiny_text_config("moe")


@pytest.fixture
def tiny_weights(tiny_moe_cfg) -> dict[str, torch.Tensor]:
    return random_weights(tiny_moe_cfg, seed=1)


@pytest.fixture(name="modelopt_layout")
def modelopt_layout_fixture():
    return modelopt_layout


@pytest.fixture(name="write_checkpoint")
def write_checkpoint_fixture():
    return write_checkpoint
