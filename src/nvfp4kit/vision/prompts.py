"""Prompts with images: placeholders expanded to image tokens, images encoded to soft-token embeddings.

A prompt holds one `<|image|>` placeholder (the checkpoint's `image_token_id`) per image, where the chat template
or the user put it. Each placeholder becomes `<|image>` + N x `<|image|>` + `<image|>` (ids from config.json),
N being that image's soft-token count after preprocessing; the vision tower's output for the image later
replaces the N embeddings. Prompts for `LLM.generate` may be given as vLLM does:
`{"prompt": "...<|image|>...", "multi_modal_data": {"image": PIL.Image or [images]}}` (or `prompt_token_ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.config import MultimodalConfig, load_multimodal_config
from nvfp4kit.vision.inputs import ImageInputs, Span
from nvfp4kit.vision.preprocess import preprocess_image
from nvfp4kit.vision.tower import VisionTower

SUPPORTED_MODALITIES = ("image",)


def expand_placeholders(
    ids: Sequence[int], soft_tokens: Sequence[int], cfg: MultimodalConfig
) -> tuple[list[int], tuple[Span, ...]]:
    """Each image placeholder -> boi, n image tokens, eoi; returns the ids and the soft tokens' spans."""
    slots = [i for i, t in enumerate(ids) if t == cfg.image_token_id]
    if len(slots) != len(soft_tokens):
        raise ValueError(
            f"the prompt has {len(slots)} image placeholders but {len(soft_tokens)} images were given: put one "
            f"image token (id {cfg.image_token_id}, '<|image|>') where each image goes"
        )
    out: list[int] = []
    spans: list[Span] = []
    prev = 0
    for slot, n in zip(slots, soft_tokens):
        out += ids[prev:slot]
        out.append(cfg.boi_token_id)
        spans.append((len(out), len(out) + n))
        out += [cfg.image_token_id] * n
        out.append(cfg.eoi_token_id)
        prev = slot + 1
    out += ids[prev:]
    return out, tuple(spans)


def group_by_patches(patches: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive image indices in groups whose padded size (count x longest) stays within `budget`
    patches; an image larger than the budget is a group alone."""
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(patches):
        if groups and max(longest, n) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


class ImagePrompts:
    """Image preprocessing, the vision tower and prompt expansion for one loaded model."""

    def __init__(self, config: MultimodalConfig, tower: VisionTower):
        self.config, self.tower = config, tower

    @classmethod
    def from_checkpoint(
        cls, folder: str | Path, *, dtype: torch.dtype, device: torch.device, backend: Any = None
    ) -> ImagePrompts | None:
        """None for a checkpoint without a vision tower."""
        from nvfp4kit.vision.loader import load_vision_tower

        config = load_multimodal_config(folder)
        if config is None:
            return None
        tower = load_vision_tower(folder, dtype=dtype, device=device, backend=backend, config=config)
        return cls(config, tower)

    @torch.inference_mode()
    def encode(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Soft-token embeddings [n_i, text hidden] of each image (PIL image, encoded bytes or path), batched
        in groups whose padded patches fit one full-budget image: the encoder's peak memory is then the one
        image the start-up plan counts (`nvfp4kit.plan.vision`), and small images still share a batch."""
        processed = [preprocess_image(image, self.config.processor) for image in images]
        out: list[torch.Tensor] = []
        for group in group_by_patches(
            [p.patches.shape[0] for p in processed], self.config.processor.max_patches
        ):
            chosen = [processed[i] for i in group]
            out += self.tower([p.patches for p in chosen], [p.positions for p in chosen])
        return out

    def build(self, ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], ImageInputs]:
        """Expanded prompt ids and the `ImageInputs` the engine carries with the request."""
        embeds = self.encode(images) if images else []
        expanded, spans = expand_placeholders(ids, [e.shape[0] for e in embeds], self.config)
        flat = torch.cat(embeds) if embeds else torch.zeros(0, self.config.text_hidden_size)
        return expanded, ImageInputs(spans, flat, bidirectional=self.config.bidirectional_images)


def split_prompt(prompt: Any) -> tuple[str | list[int], list[Any]]:
    """A prompt (text, token ids, or a dict with `prompt`/`prompt_token_ids` and `multi_modal_data`) -> the text
    or ids and its images (empty for a plain prompt)."""
    if not isinstance(prompt, dict):
        return prompt, []
    if "prompt" in prompt:
        body = prompt["prompt"]
    elif "prompt_token_ids" in prompt:
        body = [int(t) for t in prompt["prompt_token_ids"]]
    else:
        raise ValueError("a dict prompt needs 'prompt' (text) or 'prompt_token_ids'")
    data = prompt.get("multi_modal_data") or {}
    unsupported = sorted(set(data) - set(SUPPORTED_MODALITIES))
    if unsupported:
        raise ValueError(f"unsupported input modality {unsupported}: only images are supported")
    images = data.get("image", [])
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    return body, images


def encode_prompt(
    prompt: Any, tokenizer: Tokenizer, image_prompts: Callable[[], ImagePrompts | None]
) -> tuple[list[int], ImageInputs | None]:
    """Token ids (placeholders expanded) and image inputs of any prompt form `LLM.generate` accepts.

    `image_prompts` is called only for a prompt with images (the tower loads at the first image)."""
    body, images = split_prompt(prompt)
    ids = tokenizer.encode(body) if isinstance(body, str) else [int(t) for t in body]
    if not images:
        return ids, None
    image_prompts = image_prompts()
    if image_prompts is None:
        raise ValueError(
            "this model takes text only (no vision tower, or images off with --language-model-only): it cannot take images"
        )
    return image_prompts.build(ids, images)
