"""Shapes of the tiny test checkpoints and their tokenizer's special ids (no torch needed to read them)."""

from __future__ import annotations

from typing import Any

from nvfp4kit.config import FULL, SLIDING

# Gemma 4's control tokens at their real ids.
SPECIAL_TOKENS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}  # fmt: skip
FIRST_BYTE_ID = 108
TINY_VOCAB = 384

_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "global_head_dim": 32, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0, "max_position_embeddings": 4096, "sliding_window": 8,
    "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": [1, 106],
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": TINY_VOCAB, "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False, "enable_moe_block": False, "attention_k_eq_v": False,
}  # fmt: skip

SHAPES: dict[str, dict[str, Any]] = {
    # 26B-A4B-like: 5 sliding : 1 global, K=V global layers with fewer, wider KV heads, MoE + dense MLP.
    "moe": {"num_hidden_layers": 6, "intermediate_size": 48, "attention_k_eq_v": True,
            "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
            "moe_intermediate_size": 32},
    # 31B-like: dense MLP only, separate V on global layers.
    "dense": {"num_hidden_layers": 6, "intermediate_size": 96},
    # E2B-like: per-layer embeddings, the last 3 layers reuse earlier KV, double-wide MLP on those.
    "e2b": {"num_hidden_layers": 7, "intermediate_size": 48, "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 3, "use_double_wide_mlp": True,
            "layer_types": [SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, FULL]},
}  # fmt: skip


def tiny_text_config(shape: str = "moe", **overrides: Any) -> dict[str, Any]:
    if shape not in SHAPES:
        raise ValueError(f"unknown tiny shape {shape!r}; choose from {sorted(SHAPES)}")
    cfg = {**_COMMON, **SHAPES[shape], **overrides}
    n = cfg["num_hidden_layers"]
    cfg.setdefault("layer_types", [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    cfg["layer_types"][-1] = FULL
    cfg["model_type"] = "gemma4_text"
    return cfg


# Multimodal tiny checkpoints (`write_tiny_checkpoint(..., multimodal=True, vision=True)`): the image and audio
# control tokens sit in the unused ids above the byte tokens (real Gemma 4 uses 255999, 258880, ...).
MULTIMODAL_TOKEN_IDS = {
    "boi_token_id": 364, "eoi_token_id": 365, "image_token_id": 366, "video_token_id": 367,
    "boa_token_id": 368, "eoa_token_index": 369, "audio_token_id": 370,
}  # fmt: skip
MULTIMODAL_SPECIAL_TOKENS = {
    364: "<|image>", 365: "<image|>", 366: "<|image|>", 367: "<|video|>", 368: "<|audio>", 369: "<audio|>",
    370: "<|audio|>",
}  # fmt: skip

# A 2-layer vision tower; 70 soft tokens per image (the smallest budget Gemma 4's processor allows) of 3x3
# pooled 4x4-pixel patches, so an image is at most 630 patches.
TINY_VISION: dict[str, Any] = {
    "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
    "pooling_kernel_size": 3, "patch_size": 4, "position_embedding_size": 256, "use_clipped_linears": True,
    "standardize": True,
}  # fmt: skip
TINY_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "Gemma4ImageProcessor", "patch_size": 4, "max_soft_tokens": 70,
    "pooling_kernel_size": 3, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": False, "do_convert_rgb": True,
}  # fmt: skip
