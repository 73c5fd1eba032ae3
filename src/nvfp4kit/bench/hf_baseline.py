"""The HF transformers baseline of `nvfp4kit bench engine`: Gemma4ForCausalLM in BF16, same shape, same prompts.

This is what a user gets from `model.generate` without a serving engine (no paging, no graphs, BF16 weights).
Random weights are initialised directly on the GPU; a real checkpoint loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def hf_text_config(raw: dict):
    """transformers' Gemma4TextConfig from a config.json dict (the multimodal form or the text-only one)."""
    import transformers

    text = dict(raw.get("text_config", raw))
    text.pop("model_type", None)
    return transformers.Gemma4TextConfig(**text)


def load_hf_model(*, preset_config: dict | None = None, path: str | Path | None = None, device: str = "cuda"):
    """BF16 Gemma4ForCausalLM: random weights of `preset_config`'s shape, or the checkpoint at `path`."""
    import transformers

    if path is not None:
        model = transformers.Gemma4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    else:
        config = hf_text_config(preset_config or {})
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = transformers.Gemma4ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.eval()


def preset_raw_config(path: Path) -> dict:
    return json.loads(path.read_text())["config"]


def _generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_decode_speed(model, prompt: list[list[int]], *, new_tokens: int) -> float:
    """Aggregate decode tokens/s of `model.generate` (greedy): the time of n tokens minus that of 1 (prefill)."""
    ids = torch.tensor(prompt, device="cuda")
    _generate(model, ids, 2)  # warm-up
    first = _generate(model, ids, 1)
    total = _generate(model, ids, new_tokens)
    return ids.shape[0] * (new_tokens - 1) / max(total - first, 1e-9)


@torch.inference_mode()
def hf_prefill_speed(model, prompt: list[int]) -> float:
    """Prompt tokens/s of one forward pass that returns the last position's logits."""
    ids = torch.tensor([prompt], device="cuda")
    model(ids, logits_to_keep=1)  # warm-up at the same length (kernel selection, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return ids.shape[1] / (time.perf_counter() - t0)
