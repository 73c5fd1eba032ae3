"""One rank's shard cut from a whole model already in memory (random weights for benchmarks; tests).

The same rules as loading a shard from a checkpoint (`plan/parallel.py`), applied to the fused modules:
q/k/v rows by head, gate/up rows by half, o_proj and down_proj columns, experts, vocab rows. NVFP4 weights are
cut in packed bytes and block scales alike (the input-dim cuts are multiples of 16 by `ParallelLayout.check`).
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import BLOCK, NVFP4Tensor
from nvfp4kit.model.gemma4 import Attention, DecoderLayer, Experts, Gemma4Model
from nvfp4kit.model.layers import Linear, stored_weight
from nvfp4kit.model.ops import Weight
from nvfp4kit.plan.parallel import ParallelLayout, even_part


def _rows(weight: Weight, spans: list[tuple[int, int]]) -> Weight:
    """Rows [a, b) of each span, concatenated (the output dim; experts' second-to-last dim)."""
    if isinstance(weight, NVFP4Tensor):
        packed = torch.cat([weight.packed[..., a:b, :] for a, b in spans], dim=-2)
        scale = torch.cat([weight.scale[..., a:b, :] for a, b in spans], dim=-2)
        return NVFP4Tensor(packed.clone(), scale.clone(), weight.scale_2.clone())
    return torch.cat([weight[..., a:b, :] for a, b in spans], dim=-2).clone()


def _columns(weight: Weight, start: int, stop: int) -> Weight:
    """Input columns [start, stop) (multiples of the NVFP4 block when quantized)."""
    if isinstance(weight, NVFP4Tensor):
        packed = weight.packed[..., start // 2 : stop // 2].clone()
        scale = weight.scale[..., start // BLOCK : stop // BLOCK].clone()
        return NVFP4Tensor(packed, scale, weight.scale_2.clone())
    return weight[..., start:stop].clone()


def _qkv_spans(attn: Attention, layout: ParallelLayout, rank: int) -> list[tuple[int, int]]:
    q_size = attn.num_heads * attn.head_dim
    spans = [even_part(q_size, layout.world, rank, what="q_proj")]
    if attn.computes_kv:
        first, stop = layout.kv_head_range(attn.layer, rank)
        kv_size = attn.num_kv_heads * attn.head_dim
        for base in [q_size, q_size + kv_size][: 2 if attn.has_v_proj else 1]:
            spans.append((base + first * attn.head_dim, base + stop * attn.head_dim))
    return spans


def shard_model(full: Gemma4Model, layout: ParallelLayout, rank: int) -> Gemma4Model:
    """Rank `rank`'s model cut from `full` (on `full`'s device; `full` is left as it was)."""
    n = layout.world
    local = Gemma4Model(layout.local_config(), backend=full.backend).to(full.device)
    vocab, experts = layout.vocab_range(rank), layout.expert_range(rank)
    local.embed_tokens = full.embed_tokens[vocab.start : vocab.stop].clone()
    if full.lm_head is not None:
        local.lm_head = full.lm_head[vocab.start : vocab.stop].clone()
    if getattr(full, "embed_tokens_per_layer", None) is not None:
        local.embed_tokens_per_layer = full.embed_tokens_per_layer
    for name, param in local.named_parameters():  # norms and router vectors: every rank holds them whole
        param.data = full.get_parameter(name).data
    for (name, module), mine in zip(full.named_modules(), local.modules()):
        if isinstance(module, Linear):
            weight = stored_weight(module, "weight")
            kind = name.rsplit(".", 1)[-1]
            if kind == "qkv_proj":
                attn = full.get_submodule(name.rsplit(".", 1)[0])
                weight = _rows(weight, _qkv_spans(attn, layout, rank))
            elif kind == "gate_up_proj":
                half = module.splits[0]
                a, b = even_part(half, n, rank, what=name)
                weight = _rows(weight, [(a, b), (half + a, half + b)])
            elif kind in ("o_proj", "down_proj"):
                weight = _columns(weight, *even_part(module.in_features, n, rank, what=name))
            mine.set_weight(weight)
        elif isinstance(module, Experts):
            gate_up, down = stored_weight(module, "gate_up"), stored_weight(module, "down")
            if layout.moe == "tensor":  # every expert, a slice of its width (as the dense MLP)
                half = module.gate_up_shape[1] // 2
                a, b = even_part(half, n, rank, what=name)
                mine.set_weights(_rows(gate_up, [(a, b), (half + a, half + b)]), _columns(down, a, b))
                continue
            mine.keep_only(experts.start, len(experts))
            pick = slice(experts.start, experts.stop)
            mine.set_weights(*(_expert_range(w, pick) for w in (gate_up, down)))
        elif isinstance(module, DecoderLayer):
            mine.layer_scalar = module.layer_scalar.clone()
    return local


def _expert_range(weight: Weight, pick: slice) -> Weight:
    if isinstance(weight, NVFP4Tensor):
        return NVFP4Tensor(
            weight.packed[pick].clone(), weight.scale[pick].clone(), weight.scale_2[pick].clone()
        )
    return weight[pick].clone()
