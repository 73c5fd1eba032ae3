"""What a multimodal Gemma 4 checkpoint says about images: the vision tower's shape, the image token ids,
the attention pattern of image tokens and the image processor's settings.

Read from `config.json` (`vision_config`, `boi_token_id`, `eoi_token_id`, `image_token_id`,
`text_config.use_bidirectional_attention`) and, for the processor, `processor_config.json` (transformers >= 5
nests `image_processor` there) or `preprocessor_config.json`; missing processor values fall back to
`vision_config` and Gemma 4's defaults (280 soft tokens per image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Gemma 4's processor only accepts these per-image soft-token budgets.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    use_clipped_linears: bool = False
    standardize: bool = False


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int = 280
    rescale_factor: float = 1 / 255
    do_convert_rgb: bool = True

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2


@dataclass(frozen=True)
class MultimodalConfig:
    """Everything image input needs besides weights."""

    vision: VisionConfig
    processor: ImageProcessorConfig
    boi_token_id: int  # <|image>: opens an image
    eoi_token_id: int  # <image|>: closes it
    image_token_id: int  # <|image|>: the placeholder in prompts, repeated once per soft token after expansion
    bidirectional_images: bool  # image tokens attend to each other both ways (sliding layers only)
    text_hidden_size: int


def vision_config_from_dict(raw: dict[str, Any]) -> VisionConfig:
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision tower: only axial RoPE is supported, got {rope.get('rope_type')!r}")
    act = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"vision tower: unsupported activation {act!r}")
    heads = int(raw.get("num_attention_heads", 12))
    hidden = int(raw.get("hidden_size", 768))
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size", 3072)),
        num_hidden_layers=int(raw.get("num_hidden_layers", 16)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        patch_size=int(raw.get("patch_size", 16)),
        pooling_kernel_size=int(raw.get("pooling_kernel_size", 3)),
        position_embedding_size=int(raw.get("position_embedding_size", 10 * 1024)),
        rope_theta=float(rope.get("rope_theta", 100.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        use_clipped_linears=bool(raw.get("use_clipped_linears", False)),
        standardize=bool(raw.get("standardize", False)),
    )


def _processor_dict(folder: Path) -> dict[str, Any]:
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = folder / name
        if file.is_file():
            raw = json.loads(file.read_text())
            return raw.get("image_processor", raw)
    return {}


def load_multimodal_config(folder: str | Path) -> MultimodalConfig | None:
    """The checkpoint's image settings, or None for a text-only checkpoint (no `vision_config`)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if not raw.get("vision_config"):
        return None
    vision = vision_config_from_dict(raw["vision_config"])
    proc = _processor_dict(folder)
    processor = ImageProcessorConfig(
        patch_size=int(proc.get("patch_size", vision.patch_size)),
        pooling_kernel_size=int(proc.get("pooling_kernel_size", vision.pooling_kernel_size)),
        max_soft_tokens=int(proc.get("max_soft_tokens", 280)),
        rescale_factor=float(proc.get("rescale_factor", 1 / 255)),
        do_convert_rgb=bool(proc.get("do_convert_rgb", True)),
    )
    if processor.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(
            f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {processor.max_soft_tokens}"
        )
    text = raw.get("text_config") or {}
    ids = {k: raw.get(k) for k in ("boi_token_id", "eoi_token_id", "image_token_id")}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{folder}/config.json has a vision_config but no {missing}")
    return MultimodalConfig(
        vision=vision,
        processor=processor,
        boi_token_id=int(ids["boi_token_id"]),
        eoi_token_id=int(ids["eoi_token_id"]),
        image_token_id=int(ids["image_token_id"]),
        bidirectional_images=text.get("use_bidirectional_attention") == "vision",
        text_hidden_size=int(text["hidden_size"]),
    )
