"""The Gemma 4 vision tower and its projector into the text model's embedding space.

Patches (flattened RGB in [0, 1]) -> linear + learned 2-D position embeddings -> bidirectional encoder layers
(q/k norms, 2-D axial RoPE, GeGLU MLP, sandwich norms) -> k x k average pooling over the patch grid ->
* sqrt(hidden) -> optional standardisation -> the projector (`embed_vision`: RMSNorm without weight, linear).
One soft token per pooled cell, in row-major order. Linears go through the same op backend as the text model.

Images are batched by padding to the longest one; padding patches are masked out as keys and dropped, so each
image's features equal encoding it alone (and equal transformers', which pads every image to the budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4kit.model.layers import Linear
from nvfp4kit.model.ops import OpBackend, TorchBackend, apply_rope, gelu_tanh, rms_norm, rope_cos_sin
from nvfp4kit.vision.config import VisionConfig


class ClippedLinear(nn.Module):
    """A linear whose input and output may be clamped to bounds stored in the checkpoint (`use_clipped_linears`)."""

    def __init__(self, in_features: int, out_features: int, *, clipped: bool, backend: OpBackend):
        super().__init__()
        self.linear = Linear(in_features, (out_features,), backend=backend)
        self.clipped = clipped
        for name in ("input_min", "input_max", "output_min", "output_max"):
            self.register_buffer(name, torch.tensor(float("inf") * (1 if name.endswith("max") else -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min.to(x.dtype), self.input_max.to(x.dtype))
        y = self.linear(x)
        if self.clipped:
            y = torch.clamp(y, self.output_min.to(y.dtype), self.output_max.to(y.dtype))
        return y


class VisionNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, backend: OpBackend):
        super().__init__()
        h, hd, clip = cfg.hidden_size, cfg.head_dim, cfg.use_clipped_linears
        self.heads, self.kv_heads, self.head_dim, self.eps = (
            cfg.num_attention_heads, cfg.num_key_value_heads, hd, cfg.rms_norm_eps,
        )  # fmt: skip
        self.q_proj = ClippedLinear(h, self.heads * hd, clipped=clip, backend=backend)
        self.k_proj = ClippedLinear(h, self.kv_heads * hd, clipped=clip, backend=backend)
        self.v_proj = ClippedLinear(h, self.kv_heads * hd, clipped=clip, backend=backend)
        self.o_proj = ClippedLinear(self.heads * hd, h, clipped=clip, backend=backend)
        self.q_norm = VisionNorm(hd, cfg.rms_norm_eps)
        self.k_norm = VisionNorm(hd, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], key_mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B, N, H]; rope: cos/sin of the x and y coordinates [B*N, D/2]; key_mask [B, N] (True: a patch)."""
        b, n, _ = x.shape
        flat = x.reshape(b * n, -1)
        q = _rope_2d(self.q_norm(self.q_proj(flat).view(b * n, self.heads, -1)), rope)
        k = _rope_2d(self.k_norm(self.k_proj(flat).view(b * n, self.kv_heads, -1)), rope)
        v = rms_norm(self.v_proj(flat).view(b * n, self.kv_heads, -1), None, self.eps)
        q, k, v = (t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, D]
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # fused attention (no [heads, N, N] scores in memory on a GPU); scale 1.0: q and k are RMS-normalised
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=1.0)
        out = out.transpose(1, 2).reshape(b * n, -1)
        return self.o_proj(out).view(b, n, -1)


def _rope_2d(x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """First half of the head dim rotated by the patch's x coordinate, second half by its y (neox pairs in each)."""
    cos_x, sin_x, cos_y, sin_y = rope
    half = x.shape[-1] // 2
    return torch.cat(
        [apply_rope(x[..., :half], cos_x, sin_x), apply_rope(x[..., half:], cos_y, sin_y)], dim=-1
    )


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, backend: OpBackend):
        super().__init__()
        h, i, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippedLinear(h, i, clipped=clip, backend=backend)
        self.up_proj = ClippedLinear(h, i, clipped=clip, backend=backend)
        self.down_proj = ClippedLinear(i, h, clipped=clip, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, backend: OpBackend):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg, backend)
        self.mlp = VisionMLP(cfg, backend)
        self.input_layernorm = VisionNorm(h, eps)
        self.post_attention_layernorm = VisionNorm(h, eps)
        self.pre_feedforward_layernorm = VisionNorm(h, eps)
        self.post_feedforward_layernorm = VisionNorm(h, eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], key_mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionTower(nn.Module):
    """`VisionTower(cfg, text_hidden)(patches, positions)` -> one [num_soft_tokens, text_hidden] tensor per image."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int, *, backend: OpBackend | None = None):
        super().__init__()
        self.config = cfg
        backend = backend or TorchBackend()
        h = cfg.hidden_size
        self.input_proj = Linear(3 * cfg.patch_size**2, (h,), backend=backend)
        self.register_buffer("position_embedding_table", torch.zeros(2, cfg.position_embedding_size, h))
        self.layers = nn.ModuleList(VisionLayer(cfg, backend) for _ in range(cfg.num_hidden_layers))
        self.register_buffer("std_bias", torch.zeros(h) if cfg.standardize else None)
        self.register_buffer("std_scale", torch.ones(h) if cfg.standardize else None)
        self.projection = Linear(h, (text_hidden_size,), backend=backend)  # embed_vision.embedding_projection
        spatial = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.position_embedding_table.dtype

    @property
    def device(self) -> torch.device:
        return self.position_embedding_table.device

    def forward(self, patches: list[torch.Tensor], positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """patches[i] [n_i, 3 * patch^2] in [0, 1], positions[i] [n_i, 2] (x, y) -> soft tokens per image."""
        dtype, dev = self.dtype, self.device
        n = max(p.shape[0] for p in patches)
        b = len(patches)
        pix = torch.zeros(b, n, patches[0].shape[1], dtype=torch.float32, device=dev)
        pos = torch.zeros(b, n, 2, dtype=torch.long, device=dev)
        key_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
        for i, (p, xy) in enumerate(zip(patches, positions)):
            pix[i, : p.shape[0]] = p.to(dev, torch.float32)
            pos[i, : p.shape[0]] = xy.to(dev)
            key_mask[i, : p.shape[0]] = True
        x = self.input_proj((2 * (pix - 0.5)).to(dtype).reshape(b * n, -1)).view(b, n, -1)  # to [-1, 1] here
        table = self.position_embedding_table
        x = x + F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        flat = pos.reshape(b * n, 2)
        rope = (
            *rope_cos_sin(self.inv_freq, flat[:, 0], dtype),
            *rope_cos_sin(self.inv_freq, flat[:, 1], dtype),
        )
        for layer in self.layers:
            x = layer(x, rope, key_mask)
        return [self._pool_project(x[i, : p.shape[0]], pos[i, : p.shape[0]]) for i, p in enumerate(patches)]

    def _pool_project(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Average k x k cells of the patch grid (row-major cell order), scale, standardise, project."""
        cfg, k = self.config, self.config.pooling_kernel_size
        cells_x = (int(pos[:, 0].max()) + 1) // k
        cell = torch.div(pos, k, rounding_mode="floor")
        index = cell[:, 0] + cells_x * cell[:, 1]
        pooled = torch.zeros(x.shape[0] // k**2, x.shape[1], dtype=torch.float32, device=x.device)
        pooled = pooled.index_add_(0, index, x.float()) / k**2
        # scaled in fp32: sqrt(hidden) can push half-precision activations past their range before standardising
        pooled = pooled.to(x.dtype).float() * cfg.hidden_size**0.5
        if cfg.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        pooled = pooled.to(x.dtype)
        return self.projection(rms_norm(pooled, None, cfg.rms_norm_eps))
