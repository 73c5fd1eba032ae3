"""`nvfp4kit quantize` keeps the vision tower and projector as they were (BF16/fp32, listed in ModelOpt's
exclude_modules), and the NVFP4 checkpoint answers image prompts with the same image features."""

import json

import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.quant import quantize

from .conftest import random_image


def test_quantize_copies_the_tower_and_images_still_work(vision_checkpoint, tmp_path):
    out = tmp_path / "nvfp4"
    quantize(vision_checkpoint, out, num_samples=2, seq_len=32, progress=False)
    src, dst = CheckpointReader(vision_checkpoint), CheckpointReader(out)
    tower = [n for n in src.names() if n.startswith(("model.vision_tower.", "model.embed_vision."))]
    assert tower and all(torch.equal(src.get(n), dst.get(n)) for n in tower)
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert {"model.vision_tower*", "model.embed_vision*"} <= set(excluded)
    prompt = {"prompt": "Describe <|image|> briefly.", "multi_modal_data": {"image": random_image(40, 56)}}
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(out) as llm:
        answer = llm.generate(prompt, greedy)[0]
    assert len(answer.outputs[0].token_ids) == 4
