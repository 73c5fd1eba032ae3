"""Tiny random Gemma 4 checkpoints of the family's shapes, written as transformers would write them.

`write_tiny_checkpoint(folder, shape="moe")` creates config.json, generation_config.json, safetensors
weights, a small byte-level tokenizer whose control tokens sit at Gemma 4's real ids (so stop ids
[1, 106, 50] mean the same), and the package's Gemma 4 chat template. Used by the tests and by
`nvfp4kit make-tiny`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nvfp4kit.config import config_from_dict
from nvfp4kit.testing.tiny_config import (
    FIRST_BYTE_ID,
    MULTIMODAL_SPECIAL_TOKENS,
    MULTIMODAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    TINY_IMAGE_PROCESSOR,
    TINY_VISION,
    TINY_VOCAB,
    tiny_text_config,
)

__all__ = ["SPECIAL_TOKENS", "TINY_VOCAB", "random_weights", "tiny_text_config", "write_tiny_checkpoint"]


def random_weights(
    text_cfg: dict[str, Any], *, seed: int = 0, outliers: bool = False
) -> dict[str, torch.Tensor]:
    """Random fp32 weights with HF names (no prefix); scaled so activations stay O(1) and logits are varied."""
    cfg = config_from_dict(text_cfg)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out: int, inp: int) -> torch.Tensor:
        w = randn(out, inp, std=inp**-0.5)
        if outliers:  # a few input channels 20x larger, the pattern real activations/weights show
            w[:, torch.randperm(inp, generator=gen)[: max(1, inp // 32)]] *= 20.0
        return w

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + randn(dim, std=0.1)

    h = cfg.hidden_size
    w: dict[str, torch.Tensor] = {
        "embed_tokens.weight": randn(cfg.vocab_size, h, std=h**-0.5),
        "norm.weight": norm(h),
    }
    if cfg.hidden_size_per_layer_input:
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        w["embed_tokens_per_layer.weight"] = randn(cfg.vocab_size_per_layer_input, n * p, std=p**-0.5)
        w["per_layer_model_projection.weight"] = linear(n * p, h)
        w["per_layer_projection_norm.weight"] = norm(p)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        hd, kv, heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
        w[p + "self_attn.q_proj.weight"] = linear(heads * hd, h)
        w[p + "self_attn.q_norm.weight"] = norm(hd)
        if cfg.kv_source_layer(i) == i:
            w[p + "self_attn.k_proj.weight"] = linear(kv * hd, h)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
            if cfg.layer_has_v_proj(i):
                w[p + "self_attn.v_proj.weight"] = linear(kv * hd, h)
        w[p + "self_attn.o_proj.weight"] = linear(h, heads * hd)
        inter = cfg.layer_intermediate_size(i)
        w[p + "mlp.gate_proj.weight"] = linear(inter, h)
        w[p + "mlp.up_proj.weight"] = linear(inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):  # fmt: skip
            w[p + name + ".weight"] = norm(h)
        w[p + "layer_scalar"] = torch.tensor([0.5 + torch.rand(1, generator=gen).item()])
        if cfg.enable_moe_block:
            e, mi = cfg.num_experts, cfg.moe_intermediate_size
            w[p + "router.proj.weight"] = linear(e, h) * 4.0  # sharper routing than uniform
            w[p + "router.scale"] = norm(h)
            w[p + "router.per_expert_scale"] = 0.5 + torch.rand(e, generator=gen)
            w[p + "experts.gate_up_proj"] = torch.stack([linear(2 * mi, h) for _ in range(e)])
            w[p + "experts.down_proj"] = torch.stack([linear(h, mi) for _ in range(e)])
            for name in (
                "pre_feedforward_layernorm_2",
                "post_feedforward_layernorm_1",
                "post_feedforward_layernorm_2",
            ):
                w[p + name + ".weight"] = norm(h)
        if cfg.hidden_size_per_layer_input:
            ple = cfg.hidden_size_per_layer_input
            w[p + "per_layer_input_gate.weight"] = linear(ple, h)
            w[p + "per_layer_projection.weight"] = linear(h, ple)
            w[p + "post_per_layer_input_norm.weight"] = norm(h)
    return w


def random_vision_weights(
    vision: dict[str, Any], text_hidden: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random fp32 vision tower + projector weights with HF names under `model.` (activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed + 1000)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    h, inter, hd = vision["hidden_size"], vision["intermediate_size"], vision["head_dim"]
    heads, kv = vision["num_attention_heads"], vision["num_key_value_heads"]
    patch_dim = 3 * vision["patch_size"] ** 2
    t = "model.vision_tower."
    w = {
        t + "patch_embedder.input_proj.weight": randn(h, patch_dim, std=patch_dim**-0.5),
        t + "patch_embedder.position_embedding_table": randn(
            2, vision["position_embedding_size"], h, std=0.5
        ),
        "model.embed_vision.embedding_projection.weight": randn(text_hidden, h, std=h**-0.5),
    }
    if vision.get("standardize"):
        w[t + "std_bias"] = randn(h, std=0.5)
        w[t + "std_scale"] = 0.5 + torch.rand(h, generator=gen)
    shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
              "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}  # fmt: skip
    for i in range(vision["num_hidden_layers"]):
        p = f"{t}encoder.layers.{i}."
        for name, (out, inp) in shapes.items():
            w[p + name + ".linear.weight"] = randn(out, inp, std=inp**-0.5)
            if vision.get("use_clipped_linears"):  # bounds that clip a few activations, as trained ones do
                for bound, sign in (
                    ("input_min", -1),
                    ("input_max", 1),
                    ("output_min", -1),
                    ("output_max", 1),
                ):
                    w[p + name + "." + bound] = torch.tensor(
                        sign * (1.5 + torch.rand(1, generator=gen).item())
                    )
        w[p + "self_attn.q_norm.weight"] = 1.0 + randn(hd, std=0.1)
        w[p + "self_attn.k_norm.weight"] = 1.0 + randn(hd, std=0.1)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):  # fmt: skip
            w[p + name + ".weight"] = 1.0 + randn(h, std=0.1)
    return w


def write_tokenizer(
    folder: Path, vocab_size: int = TINY_VOCAB, *, extra_special: dict[int, str] | None = None
) -> None:
    """A byte-level tokenizer (no merges) with Gemma 4's control tokens at their ids, plus the chat template.

    `extra_special`: more special tokens by id (ids in the unused range above the bytes)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    extra = extra_special or {}
    vocab: dict[str, int] = {}
    for i in range(FIRST_BYTE_ID):
        vocab[SPECIAL_TOKENS.get(i, f"<unused{i}>")] = i
    for j, ch in enumerate(byte_chars):
        vocab[ch] = FIRST_BYTE_ID + j
    for i in range(len(vocab), vocab_size):
        vocab[extra.get(i, f"<unused{i}>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS.values(), *extra.values()]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
             "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 4096},
            indent=2,
        )
    )  # fmt: skip
    template = Path(__file__).resolve().parent.parent / "assets" / "chat_template.jinja"
    if template.is_file():
        shutil.copy(template, folder / "chat_template.jinja")


def _bytes_to_unicode() -> list[str]:
    """The character ByteLevel uses for each byte 0..255 (printable bytes map to themselves)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    shape: str = "moe",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    multimodal: bool = False,
    vision: bool = False,
    outliers: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random Gemma 4 checkpoint (text-only `gemma4_text`, or the multimodal `gemma4` form).

    `vision` (with `multimodal`): also a random vision tower and projector, the image token ids, the image
    processor's settings (processor_config.json) and image tokens in the tokenizer."""
    if vision and not multimodal:
        raise ValueError("vision=True needs multimodal=True")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tiny_text_config(shape, **overrides)
    weights = random_weights(text, seed=seed, outliers=outliers)
    if multimodal:
        config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                  "text_config": text, "vision_config": None, "audio_config": None, "tie_word_embeddings": True}  # fmt: skip
        prefix = "model.language_model."
        if vision:
            text["use_bidirectional_attention"] = "vision"
            config.update(vision_config=dict(TINY_VISION), **MULTIMODAL_TOKEN_IDS)
            processor = {"processor_class": "Gemma4Processor", "image_seq_length": TINY_IMAGE_PROCESSOR[
                "max_soft_tokens"], "image_processor": TINY_IMAGE_PROCESSOR}  # fmt: skip
            (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    else:
        config = {"architectures": ["Gemma4ForCausalLM"], **text}
        prefix = "model."
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 2,
                "pad_token_id": 0,
                "eos_token_id": [1, 106, 50],
                "do_sample": True,
                "temperature": 1.0,
                "top_p": 0.95,
                "top_k": 64,
            },
            indent=2,
        )  # fmt: skip
    )
    tensors = {prefix + k: v for k, v in weights.items()}
    if vision:
        tensors.update(random_vision_weights(TINY_VISION, text["hidden_size"], seed=seed))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    write_tokenizer(folder, text["vocab_size"], extra_special=MULTIMODAL_SPECIAL_TOKENS if vision else None)
    return folder
