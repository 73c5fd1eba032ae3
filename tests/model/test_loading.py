"""Strict checkpoint loading: transformers' sharded output loads; each kind of broken checkpoint is named."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.config import ConfigError
from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model


def logits(model, n=12):
    ids = torch.arange(5, 5 + n)
    with torch.no_grad():
        return model(ids, ContiguousKVCache(model.config).step(n))


@pytest.fixture
def editable(tiny_checkpoint, tmp_path):
    """A private copy of the tiny MoE checkpoint that a test may break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("moe"), folder)
    return folder


def rewrite_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


def test_sharded_save_pretrained_checkpoint_loads(tiny_checkpoint, tmp_path):
    import transformers

    src = tiny_checkpoint("moe")
    hf = transformers.Gemma4ForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    sharded, single = load_model(tmp_path / "sharded"), load_model(src)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Same weights; the CPU matmul may pick another kernel for another buffer alignment (last-ulp changes).
    torch.testing.assert_close(logits(sharded), logits(single), atol=1e-5, rtol=1e-5)


def test_weights_land_on_the_requested_dtype(tiny_checkpoint):
    model = load_model(tiny_checkpoint("moe", dtype=torch.bfloat16), dtype="float32")
    assert model.embed_tokens.dtype == torch.float32
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32


def test_missing_tensor_is_named(editable):
    rewrite_weights(editable, lambda w: w.pop("model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.down_proj\.weight'"):
        load_model(editable)


def test_unexpected_tensor_is_named(editable):
    rewrite_weights(editable, lambda w: w.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model\.layers\.0\.mystery\.weight'\]"):
        load_model(editable)


def test_misshaped_tensor_is_named(editable):
    def shrink(w):
        w["model.layers.1.self_attn.o_proj.weight"] = w["model.layers.1.self_attn.o_proj.weight"][
            :, :-16
        ].clone()

    rewrite_weights(editable, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        load_model(editable)


def test_misshaped_norm_is_named(editable):
    rewrite_weights(editable, lambda w: w.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(7,\), expected \(64,\)"):
        load_model(editable)


def test_truncated_shard_is_named(editable):
    file = editable / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(editable)


def test_garbage_header_is_named(editable):
    (editable / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        load_model(editable)


def test_missing_shard_listed_in_index_is_named(editable):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (editable / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing: \['model-00002-of-00002\.safetensors'\]"):
        load_model(editable)


def test_missing_config_is_named(editable):
    (editable / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(editable)


def test_other_architecture_is_refused(editable):
    (editable / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ConfigError, match=r"not a Gemma 4 checkpoint: model_type='llama'"):
        load_model(editable)


def test_vision_tower_is_skipped_with_one_log_line(tiny_checkpoint, tmp_path, caplog):
    folder = tmp_path / "mm"
    shutil.copytree(tiny_checkpoint("moe", multimodal=True), folder)
    rewrite_weights(folder, lambda w: w.update({"model.vision_tower.encoder.w": torch.zeros(4, 4)}))
    with caplog.at_level(logging.INFO):
        model = load_model(folder)
    assert [r.message for r in caplog.records if "vision" in r.message] == [
        "skipping 1 vision/audio tensors (text serving)"
    ]
    assert model.config.multimodal
