"""Random BF16 checkpoints of a preset's exact shapes for `nvfp4kit bench quantize`, written layer by layer.

For Gemma 4 26B-A4B: vocab 262,144, hidden 2,816, 128 experts of 704, a few input channels 20x larger (as real
weights show), one shard per layer. Checkpoints of different depths share the shards through links (the last
layer is always global: a 1-layer checkpoint is one global layer, a 6-layer one 5 sliding + 1 global).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nvfp4kit.config import PRESET_DIR, ConfigError, config_from_dict
from nvfp4kit.testing.tiny import write_tokenizer

# `--small`: the preset's structure at toy widths, for a dry run on the CPU
SMALL = dict(
    hidden_size=256, intermediate_size=192, moe_intermediate_size=64, num_experts=16, vocab_size=4096,
    vocab_size_per_layer_input=4096, head_dim=64, global_head_dim=128, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, sliding_window=64,
)  # fmt: skip


def text_config(preset: str, layers: int, small: bool) -> dict:
    file = PRESET_DIR / f"{preset}.json"
    if not file.is_file():
        raise ConfigError(f"unknown preset {preset!r} (presets/*.json)")
    text = dict(json.loads(file.read_text())["config"]["text_config"])
    if small:
        text.update(SMALL)
    text["num_hidden_layers"] = layers
    # transformers (and our config) force the last layer global: a 1-layer model is one global layer
    text["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return text


def layer_weights(cfg, i: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random BF16 weights of layer i with HF names, as testing.tiny.random_weights makes them (outliers on)."""

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    def linear(*shape: int) -> torch.Tensor:
        w = randn(*shape, std=shape[-1] ** -0.5)
        cols = torch.randperm(shape[-1], generator=gen, device=device)[: max(1, shape[-1] // 32)]
        w[..., cols] *= 20.0  # a few input channels 20x larger, as real weights show
        return w

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + randn(dim, std=0.1)

    h, p = cfg.hidden_size, f"model.layers.{i}."
    hd, kv, heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
    w = {p + "self_attn.q_proj.weight": linear(heads * hd, h), p + "self_attn.q_norm.weight": norm(hd),
         p + "self_attn.k_proj.weight": linear(kv * hd, h), p + "self_attn.k_norm.weight": norm(hd),
         p + "self_attn.o_proj.weight": linear(h, heads * hd)}  # fmt: skip
    if cfg.layer_has_v_proj(i):
        w[p + "self_attn.v_proj.weight"] = linear(kv * hd, h)
    inter, e, mi = cfg.layer_intermediate_size(i), cfg.num_experts, cfg.moe_intermediate_size
    w |= {p + "mlp.gate_proj.weight": linear(inter, h), p + "mlp.up_proj.weight": linear(inter, h),
          p + "mlp.down_proj.weight": linear(h, inter), p + "layer_scalar": torch.tensor([0.8], device=device),
          p + "router.proj.weight": linear(e, h) * 4.0, p + "router.scale": norm(h),
          p + "router.per_expert_scale": 0.5 + torch.rand(e, generator=gen, device=device),
          p + "experts.gate_up_proj": linear(e, 2 * mi, h), p + "experts.down_proj": linear(e, h, mi)}  # fmt: skip
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                 "post_feedforward_layernorm_2"):  # fmt: skip
        w[p + name + ".weight"] = norm(h)
    return {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in w.items()}


def _shard_name(i: int, layer_type: str) -> str:
    return f"layer{i}-{layer_type[:4]}.safetensors"


def _write_shard(shards: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(shards / name))
    (shards / (name + ".names")).write_text(json.dumps(sorted(tensors)))


def build_checkpoints(
    root: Path, depths: list[int], *, preset: str, small: bool, device: str
) -> dict[int, Path]:
    """Checkpoint folders root/ckpt<depth> for each depth, their shards (made once, kept across runs) under
    root/shards."""
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    texts = {d: text_config(preset, d, small) for d in depths}
    if not (shards / "embed.safetensors").exists():
        cfg = config_from_dict(texts[depths[0]])
        embed = (
            torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen, device=device) * cfg.hidden_size**-0.5
        )
        _write_shard(shards, "embed.safetensors", {"model.embed_tokens.weight": embed.to(torch.bfloat16).cpu(),
                     "model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)})  # fmt: skip
    for text in texts.values():
        cfg = config_from_dict(text)
        for i, layer_type in enumerate(text["layer_types"]):
            if not (shards / _shard_name(i, layer_type)).exists():
                _write_shard(shards, _shard_name(i, layer_type), layer_weights(cfg, i, device, gen))
    return {d: _write_folder(root / f"ckpt{d}", text, shards) for d, text in texts.items()}


def _write_folder(folder: Path, text: dict, shards: Path) -> Path:
    """A checkpoint folder whose shards (one per layer, plus the embeddings) are links into `shards`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Gemma4ForCausalLM"], **text, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, text["vocab_size"])
    files = ["embed.safetensors"] + [_shard_name(i, t) for i, t in enumerate(text["layer_types"])]
    weight_map = {}
    for f in files:
        for name in json.loads((shards / (f + ".names")).read_text()):
            weight_map[name] = f
        link = folder / f
        if not link.exists():
            link.symlink_to((shards / f).resolve())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder
