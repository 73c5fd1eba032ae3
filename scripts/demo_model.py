"""A trainable Gemma 4 text decoder in plain torch, batched [B, T], with transformers' parameter names.

Same math as `nvfp4kit.model.gemma4` (which is tested against transformers): sandwich RMSNorms without the
+1, q/k norms and a weightless v norm, attention scale 1.0, sliding-window layers with default RoPE and
global layers with proportional RoPE and K=V, a dense GeGLU MLP in parallel with top-k MoE experts, GELU-tanh,
embeddings scaled by sqrt(hidden), tied head with a tanh softcap. `state_dict()` keys are the checkpoint's
names without the `model.` prefix. Experts run densely (every expert on every token, weighted by a sparse
routing matrix): for 8 small experts that is faster than gathering tokens, and the gradient is identical.

A second definition on purpose: the package model is built for inference (weights are buffers, dense or
NVFP4, one flat token batch over a KV context, no gradients), while training needs parameters and [B, T]
batches with masks. tests/demo/test_trainer_model.py runs `train_demo.py selfcheck`, which keeps the two equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.model.layers import rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, with_weight: bool = True, init: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), init)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig, layer: int):
        super().__init__()
        self.head_dim = cfg.layer_head_dim(layer)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.layer_kv_heads(layer)
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.has_v_proj = cfg.layer_has_v_proj(layer)
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        if self.has_v_proj:
            self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        # q.k with scale 1.0 on unit-RMS vectors has std sqrt(d); start the norms so logits start near unit std.
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, init=d**-0.25)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, init=d**-0.25)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_weight=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.layer_rope(layer), d), persistent=False)

    def forward(self, x: torch.Tensor, masks: dict[int | None, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[None, :, None], emb.sin().to(x.dtype)[None, :, None]
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim))
        raw_k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        raw_v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim) if self.has_v_proj else raw_k
        q, k = _rotate(q, cos, sin), _rotate(self.k_norm(raw_k), cos, sin)
        v = self.v_norm(raw_v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=masks[self.window], scale=1.0, enable_gqa=True,
        )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root_size = cfg.hidden_size**-0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_weight=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense routing weights [N, E] (zero off the top-k) and the full probabilities [N, E]."""
        z = self.norm(x) * self.scale.to(x.dtype) * self.root_size
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, k=self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True) * self.per_expert_scale[ids]
        return torch.zeros_like(probs).scatter(-1, ids, top), probs


class Experts(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nh,eoh->eno", x, self.gate_up_proj.to(x.dtype))
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("eni,ehi->enh", F.gelu(gate, approximate="tanh") * up, self.down_proj.to(x.dtype))
        return torch.einsum("enh,ne->nh", y, routing.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"):  # fmt: skip
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), masks))
        flat = h.reshape(-1, h.shape[-1])
        routing, probs = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), routing).view_as(h)
        mlp = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        out = h + self.post_feedforward_layernorm(mlp + self.post_feedforward_layernorm_2(moe))
        return out * self.layer_scalar.to(out.dtype), _balance_loss(routing, probs)


def _balance_loss(routing: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch-style load balancing: E * sum_e (share of routed slots) * (mean probability)."""
    num_experts = probs.shape[-1]
    share = (routing > 0).float().mean(0)
    share = share / share.sum()
    return num_experts * (share * probs.mean(0)).sum()


class DemoGemma4(nn.Module):
    """`forward(ids [B, T]) -> (logits [B, T, V] fp32, balance loss)`; names match transformers' Gemma4 text model."""

    def __init__(self, cfg: Gemma4TextConfig):
        super().__init__()
        if not cfg.enable_moe_block or cfg.hidden_size_per_layer_input or cfg.num_kv_shared_layers:
            raise ValueError(
                "the demo trainer builds the MoE design only (no per-layer inputs, no KV sharing)"
            )
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        depth_scale = (2 * cfg.num_hidden_layers) ** -0.5
        nn.init.normal_(self.embed_tokens.weight, std=cfg.hidden_size**-0.5)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=param.shape[-1] ** -0.5 * depth_scale)
            elif name.endswith("experts.down_proj"):
                nn.init.normal_(param, std=param.shape[-1] ** -0.5 * depth_scale)
            elif name.endswith(("proj.weight", "experts.gate_up_proj")):
                nn.init.normal_(param, std=param.shape[-1] ** -0.5)

    def masks(self, t: int, device: torch.device) -> dict[int | None, torch.Tensor]:
        pos = torch.arange(t, device=device)
        diff = pos[:, None] - pos[None, :]
        return {
            None: diff >= 0,
            self.config.sliding_window: (diff >= 0) & (diff < self.config.sliding_window),
        }

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        x = self.embed_tokens(ids)
        x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        masks = self.masks(ids.shape[1], ids.device)
        balance = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, masks)
            balance = balance + aux
        h = self.norm(x)
        logits = F.linear(h, self.embed_tokens.weight.to(h.dtype)).float()
        cap = cfg.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits, balance / len(self.layers)

    def checkpoint_tensors(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Tensors named as transformers' `Gemma4ForCausalLM` checkpoints name them (tied head: no lm_head)."""
        out = {}
        for name, tensor in self.state_dict().items():
            if name.endswith("inv_freq"):
                continue
            out["model." + name] = tensor.detach().to(dtype).contiguous().cpu()
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, *, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
