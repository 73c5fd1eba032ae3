"""Bit-exactness with ModelOpt 0.47: its own quantize + export of the same tiny BF16 Gemma 4 MoE checkpoint.

ModelOpt runs on transformers' Gemma4ForCausalLM in fp32 (mtq.NVFP4_DEFAULT_CFG, max calibration) over the
very token ids our calibration uses, in one batch as our calibration chunk does. Every tensor name, every
packed weight, FP8 block scale, weight_scale_2 and input_scale must equal ours bit for bit, and both config
files must be identical.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.tokenizer import Tokenizer

# (our quantize() options, the ModelOpt quantizer patterns disabled to express the same recipe)
RECIPES = {
    "all-nvfp4": ({}, []),
    "attention-bf16+exclude": (
        {"recipe": "attention-bf16", "exclude": ("*layers.2.mlp*",)},
        ["*self_attn*", "*layers.2.mlp*"],
    ),
}


@pytest.fixture(scope="module", params=list(RECIPES))
def recipe(request):
    return request.param


@pytest.fixture(scope="module")
def ours(recipe, quantized):
    return quantized("moe", **RECIPES[recipe][0])


@pytest.fixture(scope="module")
def modelopt_export(recipe, bf16_checkpoint, calib_file, calib_shape, tmp_path_factory):
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    src = bf16_checkpoint("moe", outliers=True)
    num_samples, seq_len = calib_shape
    samples = calibration_samples(Tokenizer(src), [calib_file], num_samples=num_samples, seq_len=seq_len)
    assert len(samples) == num_samples and all(len(s) == seq_len for s in samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Gemma4ForCausalLM.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager"
        )
        with torch.no_grad():
            config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
            config["quant_cfg"] += [{"quantizer_name": p, "enable": False} for p in RECIPES[recipe][1]]
            mtq.quantize(model, config, lambda m: m(torch.tensor(samples)))
            out = tmp_path_factory.mktemp("modelopt") / "export"
            export_hf_checkpoint(model, export_dir=out)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.element_size() == 1 else t.reshape(-1).view(torch.int32)


def test_every_quantized_tensor_is_bit_exact(recipe, modelopt_export, ours):
    ours = CheckpointReader(ours)
    theirs = CheckpointReader(modelopt_export)
    assert sorted(ours.names()) == sorted(theirs.names())
    checked = {"weight": 0, "weight_scale": 0, "weight_scale_2": 0, "input_scale": 0}
    for name in theirs.names():
        a, b = ours.get(name), theirs.get(name)
        suffix = name.rsplit(".", 1)[-1]
        if b.dtype == torch.uint8 or suffix in ("weight_scale", "weight_scale_2", "input_scale"):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(_bits(a), _bits(b)), name
            checked[suffix] += 1
        else:  # BF16 tensors (ModelOpt writes its fp32 model's copies of the same BF16 values)
            assert torch.equal(a.float(), b.float()), name
    # 5 sliding layers x 7 linears + the K=V global layer x 6 = 41; 8 experts x 3 projections x 6 layers = 144;
    # attention-bf16 drops 23 attention linears, the exclusion layer 2's dense MLP (3)
    n = 185 if recipe == "all-nvfp4" else 185 - 23 - 3
    assert checked == {"weight": n, "weight_scale": n, "weight_scale_2": n, "input_scale": n}


def test_config_files_equal(modelopt_export, ours):
    assert json.loads((ours / "hf_quant_config.json").read_text()) == json.loads(
        (modelopt_export / "hf_quant_config.json").read_text()
    )
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((modelopt_export / "config.json").read_text())
    assert ours_cfg["quantization_config"] == theirs_cfg["quantization_config"]
    assert (ours / "hf_quant_config.json").read_text() == (
        modelopt_export / "hf_quant_config.json"
    ).read_text()


def test_loader_reads_modelopt_export_like_ours(modelopt_export, ours):
    ids = torch.arange(110, 150)

    def logits(path):
        model = load_model(path, dtype=torch.float32)
        with torch.no_grad():
            return model(ids, ContiguousKVCache(model.config).step(len(ids)))

    assert torch.equal(logits(modelopt_export), logits(ours))
