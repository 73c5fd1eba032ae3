"""Memory of the vision tower: its weights and the encoder's activation peak for one image, from config.json.

Weights: the tower (patch embedding, 2-D position table, encoder layers, standardisation) and the projector
into the text model's width, each tensor counted as `config.json` shapes it (`vision_parameter_count`; a test
checks it against a tiny checkpoint's real tensors). Activations: one image at the processor's soft-token
budget (`max_soft_tokens` x pooling_kernel^2 patches), every buffer of the widest moment of a layer counted at
once (an upper bound; `scripts/gpu_vision_bench.py` prints it next to the peak measured on a GPU). Images of a
prompt are encoded in groups of at most one full-budget image's patches, so this is the encoder's peak.
No torch: `nvfp4kit plan` runs without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SOFT_TOKENS = 280  # Gemma 4's image processor default
CLIP_BOUNDS = 4  # input/output min/max per clipped linear, kept fp32 when loaded
CLIP_BOUND_BYTES = 4


@dataclass(frozen=True)
class VisionMemory:
    """What turning images on costs: the tower's weights (as stored or loaded) and one image's encoder peak."""

    params: int
    weight_bytes: int
    activation_bytes: int
    soft_tokens: int  # per image, the processor's budget
    patches: int  # per image at that budget

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def summary(self) -> dict[str, int]:
        return {
            "params": self.params, "weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
            "soft_tokens": self.soft_tokens, "patches": self.patches, "total_bytes": self.total,
        }  # fmt: skip


def _dims(vision: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    heads = int(vision.get("num_attention_heads", 12))
    hidden = int(vision.get("hidden_size", 768))
    head_dim = int(vision.get("head_dim") or hidden // heads)
    kv_heads = int(vision.get("num_key_value_heads", heads))
    return (
        hidden,
        int(vision.get("intermediate_size", 3072)),
        heads,
        kv_heads,
        head_dim,
        int(vision.get("patch_size", 16)),
    )


def vision_parameter_count(vision: dict[str, Any], text_hidden_size: int) -> tuple[int, int]:
    """(weights, clip-bound scalars) of the tower and projector described by a `vision_config`."""
    h, inter, heads, kv_heads, hd, patch = _dims(vision)
    layers = int(vision.get("num_hidden_layers", 16))
    q, kv = heads * hd, kv_heads * hd
    per_layer = h * q + 2 * h * kv + q * h  # q, k, v, o projections
    per_layer += 3 * h * inter  # gate, up, down
    per_layer += 4 * h + 2 * hd  # four sandwich norms, q_norm, k_norm (v_norm has no weight)
    params = layers * per_layer
    params += 3 * patch**2 * h  # patch_embedder.input_proj
    params += 2 * int(vision.get("position_embedding_size", 10 * 1024)) * h  # x and y position tables
    params += 2 * h if vision.get("standardize") else 0  # std_bias, std_scale
    params += h * text_hidden_size  # embed_vision.embedding_projection
    clip = layers * 7 * CLIP_BOUNDS if vision.get("use_clipped_linears") else 0
    return params, clip


def encoder_activation_bytes(
    vision: dict[str, Any], patches: int, text_hidden_size: int, *, act_bytes: int
) -> int:
    """Live bytes while encoding one image of `patches` patches (upper bound: the widest moment of a layer)."""
    h, inter, heads, kv_heads, hd, patch = _dims(vision)
    q, kv = heads * hd, kv_heads * hd
    # residual, normed input and two outputs; q, k, v and k/v repeated to every head, attention output;
    # gate, up and their product; the 2-D RoPE cos/sin tables
    per_patch = act_bytes * (4 * h + 4 * q + 2 * kv + 3 * inter + 2 * hd)
    per_patch += 3 * patch**2 * (2 * 4 + act_bytes)  # fp32 pixels, their [-1, 1] copy, the cast input
    k = int(vision.get("pooling_kernel_size", 3))
    soft = patches // k**2
    pooled = soft * (3 * 4 * h + 2 * act_bytes * text_hidden_size)  # fp32 pooling, projector in and out
    return patches * per_patch + pooled


def vision_memory(
    raw_config: dict[str, Any],
    *,
    soft_tokens: int = DEFAULT_SOFT_TOKENS,
    float_bytes: int = 2,
    weight_bytes: int | None = None,
) -> VisionMemory | None:
    """The tower's memory for a multimodal `config.json` (None without a `vision_config`). `weight_bytes`:
    the checkpoint's own vision bytes when known (headers); else params x `float_bytes` (+ fp32 clip bounds)."""
    vision = raw_config.get("vision_config")
    if not vision or vision.get("model_type", "gemma4_vision") != "gemma4_vision":
        return None  # text-only, or a tower nvfp4kit does not run (12B's encoder-free gemma4_unified_vision)
    text_hidden = int((raw_config.get("text_config") or raw_config)["hidden_size"])
    params, clip = vision_parameter_count(vision, text_hidden)
    if weight_bytes is None:
        weight_bytes = params * float_bytes + clip * CLIP_BOUND_BYTES
    k = int(vision.get("pooling_kernel_size", 3))
    patches = soft_tokens * k**2
    activations = encoder_activation_bytes(vision, patches, text_hidden, act_bytes=float_bytes)
    return VisionMemory(params, weight_bytes, activations, soft_tokens, patches)


def processor_soft_tokens(folder: str | Path) -> int:
    """The image processor's per-image soft-token budget (processor_config.json or preprocessor_config.json)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = Path(folder) / name
        if file.is_file():
            raw = json.loads(file.read_text())
            return int(raw.get("image_processor", raw).get("max_soft_tokens", DEFAULT_SOFT_TOKENS))
    return DEFAULT_SOFT_TOKENS
