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
from nvfp4kit.testing.tiny_config import FIRST_BYTE_ID, SPECIAL_TOKENS, TINY_VOCAB, tiny_text_config

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


def write_tokenizer(folder: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A byte-level tokenizer (no merges) with Gemma 4's control tokens at their ids, plus the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i in range(FIRST_BYTE_ID):
        vocab[SPECIAL_TOKENS.get(i, f"<unused{i}>")] = i
    for j, ch in enumerate(byte_chars):
        vocab[ch] = FIRST_BYTE_ID + j
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
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
    outliers: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random Gemma 4 checkpoint (text-only `gemma4_text`, or the multimodal `gemma4` form)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tiny_text_config(shape, **overrides)
    weights = random_weights(text, seed=seed, outliers=outliers)
    if multimodal:
        config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                  "text_config": text, "vision_config": None, "audio_config": None, "tie_word_embeddings": True}  # fmt: skip
        prefix = "model.language_model."
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
    save_file(
        {prefix + k: v.to(dtype).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors")
    )
    write_tokenizer(folder, text["vocab_size"])
    return folder
