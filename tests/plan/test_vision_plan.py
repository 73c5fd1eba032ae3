"""The vision tower in the memory plan: weights from config.json equal the real tensors, the plan holds them
back from the KV cache when images are on, and text-only plans keep the rows they had."""

import json

import pytest
import torch

from nvfp4kit.cli import main
from nvfp4kit.config import PRESET_DIR
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.plan.checkpoint import weights_from_checkpoint
from nvfp4kit.plan.report import build_plan
from nvfp4kit.plan.units import GiB
from nvfp4kit.plan.vision import processor_soft_tokens, vision_memory, vision_parameter_count
from nvfp4kit.testing.tiny_config import TINY_IMAGE_PROCESSOR, TINY_VISION


def preset_json(name):
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def vision_folder(tiny_checkpoint):
    return tiny_checkpoint("moe", dtype=torch.bfloat16, multimodal=True, vision=True)


def test_parameter_count_from_the_config_equals_the_tiny_checkpoints_tensors(vision_folder):
    raw = json.loads((vision_folder / "config.json").read_text())
    params, clip = vision_parameter_count(raw["vision_config"], raw["text_config"]["hidden_size"])
    reader = CheckpointReader(vision_folder)
    tensors = [
        t
        for t in reader.tensors.values()
        if t.name.startswith(("model.vision_tower.", "model.embed_vision."))
    ]
    bounds = [t for t in tensors if t.name.endswith(("_min", "_max"))]
    assert sum(t.nbytes for t in tensors if t not in bounds) // 2 == params  # BF16 tensors
    assert sum(t.nbytes for t in bounds) // 2 == clip > 0  # TINY_VISION has use_clipped_linears
    stored = weights_from_checkpoint(vision_folder).get("vision")
    assert stored == (params + clip) * 2
    memory = vision_memory(raw, soft_tokens=processor_soft_tokens(vision_folder), weight_bytes=stored)
    assert memory.weight_bytes == stored and memory.soft_tokens == TINY_IMAGE_PROCESSOR["max_soft_tokens"]
    assert memory.patches == memory.soft_tokens * TINY_VISION["pooling_kernel_size"] ** 2


@pytest.mark.parametrize("name", ["gemma-4-26b-a4b", "gemma-4-31b", "gemma-4-e2b", "gemma-4-e4b"])
def test_parameter_count_equals_the_presets_recorded_tower(name):
    raw = preset_json(name)
    config = raw["config"]
    params, _ = vision_parameter_count(config["vision_config"], config["text_config"]["hidden_size"])
    assert params == raw["tower_parameters"]["vision"]


def test_26b_tower_is_about_1_1_gb_and_12b_encoder_free_vision_is_not_planned():
    memory = vision_memory(preset_json("gemma-4-26b-a4b")["config"])
    assert memory.weight_bytes == 572_794_416 * 2  # 1.15 GB, 1.07 GiB in BF16
    assert memory.soft_tokens == 280 and memory.patches == 2520
    assert 0.05 * GiB < memory.activation_bytes < 0.5 * GiB
    bigger = vision_memory(preset_json("gemma-4-26b-a4b")["config"], soft_tokens=1120)
    assert bigger.activation_bytes > 3.9 * memory.activation_bytes  # linear in the patches
    assert vision_memory(preset_json("gemma-4-12b")["config"]) is None  # gemma4_unified_vision: not run here


def test_vision_off_keeps_the_seed_table_and_on_moves_its_bytes_out_of_kv():
    args = dict(gpu="RTX 3090", recipe="all-nvfp4", sglang_weights=int(17.81 * GiB))
    off = build_plan("gemma-4-26b-a4b", vision=False, **args)
    on = build_plan("gemma-4-26b-a4b", **args)
    # docs/plan.md's row: weights 14.22, KV budget 7.78 GiB, 1.60M global tokens, 25 requests at 32K
    assert round(off["nvfp4kit"]["weights_bytes"] / GiB, 2) == 14.22
    assert round(off["nvfp4kit"]["kv_budget_bytes"] / GiB, 2) == 7.78
    assert off["nvfp4kit"]["requests_at_context"] == 25 and off["nvfp4kit"]["vision"] is None
    tower = on["nvfp4kit"]["vision"]
    assert on["nvfp4kit"]["kv_budget_bytes"] == off["nvfp4kit"]["kv_budget_bytes"] - tower["total_bytes"]
    assert on["nvfp4kit"]["weights_bytes"] == off["nvfp4kit"]["weights_bytes"]  # the text tower, as before
    assert on["sglang"] == off["sglang"]  # SGLang's weights already hold the tower
    # docs/plan.md's vision row: 1.21 GiB held back, 6.57 GiB KV budget, 21 requests at 32K
    assert (
        round(tower["total_bytes"] / GiB, 2) == 1.21
        and round(on["nvfp4kit"]["kv_budget_bytes"] / GiB, 2) == 6.57
    )
    assert on["nvfp4kit"]["requests_at_context"] == 21


def test_checkpoint_plan_counts_its_stored_vision_tensors(vision_folder, tiny_checkpoint):
    plan = build_plan(str(vision_folder), gpu="l4")
    assert plan["nvfp4kit"]["vision"]["weight_bytes"] == plan["weights"]["components"]["vision"]["bytes"]
    text_only = build_plan(str(tiny_checkpoint("moe", multimodal=True)), gpu="l4")  # vision_config: None
    assert text_only["nvfp4kit"]["vision"] is None


def test_cli_shows_the_vision_row_and_no_vision_drops_it(capsys):
    assert main(["plan", "gemma-4-26b-a4b", "--gpu", "RTX 3090"]) == 0
    on = capsys.readouterr().out
    assert main(["plan", "gemma-4-26b-a4b", "--gpu", "RTX 3090", "--no-vision"]) == 0
    off = capsys.readouterr().out
    assert "vision tower, GiB" in on and "(in weights)" in on and "for one 280-token image" in on
    assert "vision tower, GiB" not in off and "vision not planned" in off
    # every other line up to the roofline (whose batch follows the KV) is the same
    kv_rows = ("KV budget", "global-layer KV tokens", "requests at", "vision")
    before_roofline = off.split("Decode roofline")[0].splitlines()
    same = [line for line in before_roofline if not any(k in line for k in kv_rows)]
    assert len(same) > 20 and all(line in on.splitlines() for line in same)
