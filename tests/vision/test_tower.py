import pytest
import torch

from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.vision.config import load_multimodal_config
from nvfp4kit.vision.loader import load_vision_tower
from nvfp4kit.vision.preprocess import preprocess_image
from tests.vision.conftest import random_image, transformers


def test_image_features_equal_transformers(vision_checkpoint, hf_vision_model, hf_image_processor):
    images = [random_image(50, 90, seed=1), random_image(40, 40, seed=2), random_image(200, 30, seed=3)]
    ref_in = hf_image_processor(images, return_tensors="pt")
    with torch.no_grad():
        ref = hf_vision_model.model.get_image_features(
            ref_in["pixel_values"], ref_in["image_position_ids"]
        ).pooler_output
    cfg = load_multimodal_config(vision_checkpoint)
    tower = load_vision_tower(vision_checkpoint, dtype=torch.float32)
    processed = [preprocess_image(im, cfg.processor) for im in images]
    with torch.no_grad():  # all three batched together (padded to the longest)
        ours = tower([p.patches for p in processed], [p.positions for p in processed])
    for r, o, p in zip(ref, ours, processed):
        assert o.shape == r.shape == (p.num_soft_tokens, cfg.text_hidden_size)
        rel = ((o - r).abs().max() / r.abs().max()).item()
        assert rel < 1e-4, rel
    with torch.no_grad():  # batching does not change an image's features
        alone = tower([processed[1].patches], [processed[1].positions])[0]
    torch.testing.assert_close(alone, ours[1], rtol=1e-5, atol=1e-5)


def test_text_only_checkpoint_has_no_tower(tiny_checkpoint):
    assert load_vision_tower(tiny_checkpoint("moe", multimodal=True), dtype=torch.float32) is None


def test_missing_vision_tensor_is_named(vision_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(vision_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.vision_tower.encoder.layers.1.mlp.up_proj.linear.weight"
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj"):
        load_vision_tower(folder, dtype=torch.float32)


def test_bfloat16_tower_is_as_accurate_as_transformers_bfloat16(vision_checkpoint, hf_image_processor):
    image = random_image(50, 90, seed=1)
    ref_in = hf_image_processor([image], return_tensors="pt")
    cfg = load_multimodal_config(vision_checkpoint)
    processed = preprocess_image(image, cfg.processor)
    features = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
            vision_checkpoint, dtype=dtype
        ).eval()
        tower = load_vision_tower(vision_checkpoint, dtype=dtype)
        with torch.no_grad():
            features["hf", dtype] = (
                hf.model.get_image_features(ref_in["pixel_values"], ref_in["image_position_ids"])
                .pooler_output[0]
                .float()
            )
            features["ours", dtype] = tower([processed.patches], [processed.positions])[0].float()
    ref = features["hf", torch.float32]
    ours_err = (features["ours", torch.bfloat16] - ref).abs().mean()
    hf_err = (features["hf", torch.bfloat16] - ref).abs().mean()
    assert ours_err <= 1.5 * hf_err, f"mean error {ours_err:.4f} vs transformers' bf16 {hf_err:.4f}"


def test_clip_bounds_are_ignored_when_the_config_does_not_clip(vision_checkpoint, tmp_path):
    import json
    import shutil

    folder = tmp_path / "unclipped"
    shutil.copytree(vision_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["use_clipped_linears"] = False
    (folder / "config.json").write_text(json.dumps(config))
    tower = load_vision_tower(folder, dtype=torch.float32)
    assert not tower.layers[0].mlp.up_proj.clipped
