"""The streaming quantizer end to end: outputs, sharding, recipes, the CLI, and every refusal with its message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.cli import main
from nvfp4kit.config import ConfigError
from nvfp4kit.formats.safetensors_io import CheckpointError, CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import pipeline as pipeline_module
from nvfp4kit.quant import quantize
from nvfp4kit.quant.calib_data import CalibrationDataError
from nvfp4kit.quant.layer_quant import QuantizeError
from nvfp4kit.quant.recipe import RecipeError


@pytest.fixture
def run(calib_file, calib_shape, tmp_path):
    """run(src, out=None, **kwargs): quantize with the test calibration settings."""
    num_samples, seq_len = calib_shape

    def go(src, out=None, **kwargs):
        out = out or tmp_path / "out"
        args = dict(calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False)
        args.update(kwargs)
        return quantize(src, out, **args)

    return go


def logits(path):
    ids = torch.arange(110, 140)
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids, ContiguousKVCache(model.config).step(len(ids)))


def test_output_folder_contents(quantized):
    out = quantized("moe")
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "chat_template.jinja", "config.json", "generation_config.json", "hf_quant_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["model_type"] == "gemma4_text"


def test_small_shards_with_index_equal_one_shard(run, quantized, bf16_checkpoint, tmp_path):
    report = run(bf16_checkpoint("moe"), tmp_path / "sharded", shard_size="150KB", calib_dtype=torch.float32)
    out = report.output
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == report.output_bytes
    for shard in shards:
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        assert shard.stat().st_size - 8 - header_len <= 150_000  # the limit is on tensor data
    single = CheckpointReader(quantized("moe"))
    sharded = CheckpointReader(out)
    assert sorted(single.names()) == sorted(sharded.names())
    for name in single.names():
        a, b = single.get(name), sharded.get(name)
        assert (
            a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            if a.dim()
            else torch.equal(a, b)
        )
    assert torch.equal(logits(out), logits(quantized("moe")))


def test_existing_output_is_refused_then_overwritten(run, bf16_checkpoint, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        run(bf16_checkpoint("moe"), out)
    assert (out / "keep.txt").exists()
    run(bf16_checkpoint("moe"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "hf_quant_config.json").exists()


def test_failure_midway_leaves_nothing(run, bf16_checkpoint, tmp_path, monkeypatch):
    real = pipeline_module.quantize_layer

    def failing(reader, plan, amax, *, layer, **kwargs):
        if layer == 2:
            raise RuntimeError("disk full (simulated)")
        return real(reader, plan, amax, layer=layer, **kwargs)

    monkeypatch.setattr(pipeline_module, "quantize_layer", failing)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="simulated"):
        run(bf16_checkpoint("moe"), out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_not_a_gemma4_checkpoint(run, bf16_checkpoint, tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(bf16_checkpoint("moe"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not a Gemma 4 checkpoint: model_type='llama'"):
        run(src)


def test_already_quantized_source_is_refused(run, quantized):
    with pytest.raises(ConfigError, match="already quantized"):
        run(quantized("moe"))


def test_corrupt_shard_is_named(run, bf16_checkpoint, tmp_path):
    src = tmp_path / "truncated"
    shutil.copytree(bf16_checkpoint("moe"), src)
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* lies past the end of the file"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_file(run, bf16_checkpoint, tmp_path):
    with pytest.raises(CalibrationDataError, match="cannot read calibration file .*missing.txt"):
        run(bf16_checkpoint("moe"), calib_data=[tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CalibrationDataError, match="bad.jsonl line 2: not valid JSON"):
        run(bf16_checkpoint("moe"), calib_data=[bad])
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(CalibrationDataError, match="cannot read calibration file .*blob.txt"):
        run(bf16_checkpoint("moe"), calib_data=[binary])


def test_input_dim_not_multiple_of_16(run, bf16_checkpoint, tmp_path):
    src = bf16_checkpoint("e2b", outliers=False)  # per_layer_projection has 8 inputs
    with pytest.raises(
        QuantizeError, match=r"per_layer_projection.weight: input dimension 8 is not a multiple"
    ):
        run(src)
    report = run(src, tmp_path / "e2b", exclude=["*per_layer_projection"])
    reader = CheckpointReader(report.output)
    assert reader.info("model.layers.0.per_layer_projection.weight").dtype == "BF16"
    assert reader.info("model.layers.0.per_layer_input_gate.weight").dtype == "U8"
    assert reader.info("model.per_layer_model_projection.weight").dtype == "U8"
    assert "model.layers.0.per_layer_projection" in report.exclude_modules
    model = load_model(report.output, dtype=torch.float32)
    assert model.per_layer_model_projection.quantized and model.layers[0].per_layer_input_gate.quantized
    assert not model.layers[0].per_layer_projection.quantized
    assert torch.isfinite(logits(report.output)).all()


def test_attention_bf16_recipe(run, bf16_checkpoint, tmp_path):
    report = run(bf16_checkpoint("moe"), tmp_path / "attn", recipe="attention-bf16")
    reader = CheckpointReader(report.output)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert reader.info(f"model.layers.0.self_attn.{proj}.weight").dtype == "BF16"
        assert f"model.layers.0.self_attn.{proj}.weight_scale" not in reader
    assert reader.info("model.layers.0.mlp.gate_proj.weight").dtype == "U8"
    assert "model.layers.0.self_attn*" in report.exclude_modules
    model = load_model(report.output, dtype=torch.float32)
    assert not model.layers[0].self_attn.qkv_proj.quantized and model.layers[0].mlp.gate_up_proj.quantized


def test_exclusion_may_not_split_a_fused_group(run, bf16_checkpoint):
    with pytest.raises(RecipeError, match="split the fused group"):
        run(bf16_checkpoint("moe"), exclude=["*.v_proj"])
    with pytest.raises(RecipeError, match="some but not all of model.layers.0.experts"):
        run(bf16_checkpoint("moe"), exclude=["*experts.3.*"])


def test_multimodal_checkpoint_keeps_towers_bf16(run, bf16_checkpoint, quantized, tmp_path):
    src = tmp_path / "mm"
    shutil.copytree(bf16_checkpoint("moe", multimodal=True), src)
    weights = load_file(src / "model.safetensors")
    tower = {
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight": torch.randn(32, 24).bfloat16(),
        "model.vision_tower.encoder.layers.0.input_layernorm.weight": torch.ones(24).bfloat16(),
        "model.embed_vision.embedding_projection.weight": torch.randn(64, 24).bfloat16(),
    }
    save_file({**weights, **tower}, src / "model.safetensors")
    report = run(src, tmp_path / "mm_out")
    assert report.exclude_modules[:2] == ("lm_head", "model.embed_vision*")
    assert "model.vision_tower*" in report.exclude_modules
    assert "model.language_model.layers.0.router*" in report.exclude_modules
    reader = CheckpointReader(report.output)
    for name, tensor in tower.items():
        assert torch.equal(reader.get(name), tensor)
    assert reader.info("model.language_model.layers.0.experts.7.down_proj.weight").dtype == "U8"
    text_only = CheckpointReader(quantized("moe"))  # same weights under the text-only prefix
    for name in text_only.names():
        mm_name = name.replace("model.", "model.language_model.", 1)
        assert torch.equal(reader.get(mm_name).float(), text_only.get(name).float()), name
    assert torch.equal(logits(report.output), logits(quantized("moe")))


def test_cli(bf16_checkpoint, calib_file, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["quantize", str(bf16_checkpoint("moe")), str(out), "--calib-data", str(calib_file)]
    args += ["--num-samples", "2", "--seq-len", "32", "--no-progress", "--exclude", "*layers.5.*"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "model.layers.5*" in printed
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    assert "is not a folder" in capsys.readouterr().err
