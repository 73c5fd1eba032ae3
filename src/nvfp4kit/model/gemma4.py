"""The Gemma 4 text decoder: one definition for the CPU reference path and the GPU engine.

Tokens are processed flat, [T, hidden]: a forward step may hold one sequence's prompt chunk or many
sequences' decode tokens. Everything about where keys/values live (contiguous cache, paged pools, K=V once)
is behind the `AttentionContext` the caller passes in; heavy ops and the element-wise regions between them
(norms, RoPE, GeGLU, routing) go through the op backend (see ops.py), so a layer is a short list of launches.
The norm modules hold their weights (and name them for loading); the regions read those weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.fp8_rows import FP8RowTensor, quantize_fp8_rows
from nvfp4kit.model.branches import side_by_side
from nvfp4kit.model.layers import Linear, RMSNorm, rope_inv_freq, store_weight, stored_weight
from nvfp4kit.model.ops import (
    Collectives,
    OpBackend,
    TorchBackend,
    Weight,
    all_reduce,
    all_reduce_parts,
    gelu_tanh,
    regions,
)


class AttentionContext(Protocol):
    """Where a forward step's tokens sit and how attention reads and writes their keys/values.

    A context may also offer `kv_sink(layer)`: where the op backend's `qkv_norm_rope` can store the layer's K/V
    itself (an object its backend understands, or None); `attend` then gets k = v = None for that layer."""

    positions: torch.Tensor  # [T] absolute position of each token

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        """Store k/v [T, Hkv, D] for `layer` (None: the layer reads another layer's KV) and attend q [T, Hq, D]."""


class Attention(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig, layer: int, backend: OpBackend):
        super().__init__()
        self.backend = backend
        self.parallel: Collectives | None = None  # tensor parallel: this rank's heads; o_proj sums over ranks
        self.layer = layer
        self.eps = cfg.rms_norm_eps
        self.head_dim = cfg.layer_head_dim(layer)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.layer_kv_heads(layer)
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.computes_kv = cfg.kv_source_layer(layer) == layer
        self.has_v_proj = cfg.layer_has_v_proj(layer)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        splits = (q_size,)
        if self.computes_kv:
            splits += (kv_size, kv_size) if self.has_v_proj else (kv_size,)
        self.qkv_proj = Linear(cfg.hidden_size, splits, backend=backend)
        self.o_proj = Linear(q_size, (cfg.hidden_size,), backend=backend)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if self.computes_kv:
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_weight=False)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.layer_rope(layer), self.head_dim), persistent=False
        )

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        fused = regions(self.backend)
        # where both sides can, the kernel that makes k and v also stores them in the KV cache (one launch less)
        sink = None
        if self.computes_kv and getattr(fused, "stores_kv", False) and hasattr(ctx, "kv_sink"):
            sink = ctx.kv_sink(self.layer)
        q, k, v = fused.qkv_norm_rope(
            self.qkv_proj(x),
            positions=ctx.positions,
            inv_freq=self.inv_freq,
            q_norm=self.q_norm.weight,
            k_norm=self.k_norm.weight if self.computes_kv else None,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            v_proj=self.has_v_proj,
            eps=self.eps,
            **({} if sink is None else {"kv_sink": sink}),
        )
        if sink is not None:
            k = v = None  # stored: attend reads them from the cache
        out = ctx.attend(self.layer, q, k, v, window=self.window)
        return all_reduce(self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), self.parallel)


class MLP(nn.Module):
    """Dense GeGLU: down(gelu_tanh(gate(x)) * up(x)), gate and up fused in one launch."""

    def __init__(self, hidden: int, intermediate: int, backend: OpBackend):
        super().__init__()
        self.backend = backend
        self.gate_up_proj = Linear(hidden, (intermediate, intermediate), backend=backend)
        self.down_proj = Linear(intermediate, (hidden,), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel backend runs projection + GeGLU as one launch for a token; the calibration backends that
        # quantize/ installs on a Linear must see the projection itself, so only the projection's own backend decides
        fused = getattr(self.gate_up_proj.backend, "gate_up_geglu", None)
        if fused is not None:
            return self.down_proj(fused(x, stored_weight(self.gate_up_proj, "weight")))
        return self.down_proj(regions(self.backend).geglu(self.gate_up_proj(x)))


class Router(nn.Module):
    """softmax over all experts of proj(z), top-k, renormalise, * per_expert_scale.

    z = rmsnorm(h) * scale / sqrt(H) of the residual h. The layer runs the router inside its `ffn_inputs_routed`
    region (which makes z and routes it, one launch at decode sizes) from the weights held here; `forward` is the
    router alone, on a given z.
    """

    def __init__(self, cfg: Gemma4TextConfig, backend: OpBackend):
        super().__init__()
        self.backend = backend
        self.top_k = cfg.top_k_experts
        self.proj = Linear(cfg.hidden_size, (cfg.num_experts,), backend=backend)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts), requires_grad=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return regions(self.backend).route_tokens(
            z, stored_weight(self.proj, "weight"), self.per_expert_scale, top_k=self.top_k
        )


class Experts(nn.Module):
    """All experts' weights stacked: gate_up [E, 2I, H] (gate rows first), down [E, H, I].

    Expert parallel (`keep_only`): the module holds experts [first, first + count) of all E; a route to another
    rank's expert gets weight 0 on a local id, so it adds nothing here (its own rank adds it).
    """

    def __init__(self, cfg: Gemma4TextConfig, backend: OpBackend):
        super().__init__()
        self.backend = backend
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_shape, self.down_shape = (e, 2 * i, h), (e, h, i)
        self.first, self.count, self.total = 0, e, e

    def keep_only(self, first: int, count: int) -> None:
        """Hold experts [first, first + count) only (set before the weights)."""
        self.first, self.count = first, count
        self.gate_up_shape = (count, *self.gate_up_shape[1:])
        self.down_shape = (count, *self.down_shape[1:])

    def set_weights(self, gate_up: Weight, down: Weight) -> None:
        store_weight(self, "gate_up", gate_up, shape=self.gate_up_shape)
        store_weight(self, "down", down, shape=self.down_shape)

    def shares_gpu(self, x: torch.Tensor, ids: torch.Tensor) -> bool:
        """Whether the backend's MoE for these tokens leaves room for the dense MLP beside it (default yes)."""
        ask = getattr(self.backend, "moe_shares_gpu", None)
        return ask is None or ask(x, ids, stored_weight(self, "gate_up"), stored_weight(self, "down"))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.count != self.total:
            local = ids - self.first
            mine = (local >= 0) & (local < self.count)
            ids, weights = torch.where(mine, local, 0), torch.where(mine, weights, 0.0)
        return self.backend.moe(x, ids, weights, stored_weight(self, "gate_up"), stored_weight(self, "down"))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig, layer: int, backend: OpBackend):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.backend = backend
        self.parallel: Collectives | None = None  # tensor parallel: the MLP's and experts' partial sums
        self.eps = eps
        self.self_attn = Attention(cfg, layer, backend)
        self.mlp = MLP(h, cfg.layer_intermediate_size(layer), backend)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg, backend)
            self.experts = Experts(cfg, backend)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.ple = cfg.hidden_size_per_layer_input
        if self.ple:
            self.per_layer_input_gate = Linear(h, (self.ple,), backend=backend)
            self.per_layer_projection = Linear(self.ple, (h,), backend=backend)
            self.post_per_layer_input_norm = RMSNorm(h, eps)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, per_layer_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer on its own: residual stream in, residual stream out."""
        return self.step(x, None, ctx, per_layer_input)[0]

    def step(
        self,
        x: torch.Tensor,
        normed: torch.Tensor | None,
        ctx: AttentionContext,
        per_layer_input: torch.Tensor | None = None,
        *,
        next_norm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual out, next_norm(residual out)) from the residual x and its input-normed copy `normed` (None:
        normed here). The model chains layers through it so that each layer's last launch also makes the next
        layer's normed input (or, with the final norm as `next_norm`, the model's normed output)."""
        ops, eps = regions(self.backend), self.eps
        if normed is None:
            normed = ops.rms_norm(x, self.input_layernorm.weight, eps=eps)
        attn = self.self_attn(normed, ctx)
        post_attn, pre_ffn = self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight
        norm_weights = dict(post_attn_norm=post_attn, mlp_norm=pre_ffn, eps=eps)
        if self.moe:  # the router sees the residual, not mlp_in: its top-k comes out of the same region
            router = self.router
            h, mlp_in, experts_in, weights, ids = ops.ffn_inputs_routed(
                x, attn, **norm_weights, experts_norm=self.pre_feedforward_layernorm_2.weight,
                router_scale=router.scale, router_weight=stored_weight(router.proj, "weight"),
                per_expert_scale=router.per_expert_scale, top_k=router.top_k,
            )  # fmt: skip
            # the dense MLP and the experts meet only in the tail: they may run side by side
            mlp_out, experts_out = side_by_side(
                mlp_in,
                lambda: self.mlp(mlp_in),
                lambda: self.experts(experts_in, weights, ids),
                overlap=lambda: self.experts.shares_gpu(experts_in, ids),
            )
        else:
            h, mlp_in, _, _ = ops.ffn_inputs(x, attn, **norm_weights, experts_norm=None, router_scale=None)
            mlp_out, experts_out = self.mlp(mlp_in), None
        # each has its own post-norm: both are summed over the ranks first, in one collective
        mlp_out, experts_out = all_reduce_parts((mlp_out, experts_out), self.parallel)
        out, out_normed = ops.ffn_tail(
            h,
            mlp_out,
            experts_out,
            post_norm=self.post_feedforward_layernorm.weight,
            post_mlp_norm=self.post_feedforward_layernorm_1.weight if self.moe else None,
            post_experts_norm=self.post_feedforward_layernorm_2.weight if self.moe else None,
            layer_scalar=None if self.ple else self.layer_scalar,  # PLE layers scale after their own add
            next_norm=None if self.ple else next_norm,
            eps=eps,
        )
        if self.ple:  # (out + post_per_layer_input_norm(projection)) * layer_scalar: the tail's form again
            gated = gelu_tanh(self.per_layer_input_gate(out)) * per_layer_input
            out, out_normed = ops.ffn_tail(
                out,
                self.per_layer_projection(gated),
                None,
                post_norm=self.post_per_layer_input_norm.weight,
                post_mlp_norm=None,
                post_experts_norm=None,
                layer_scalar=self.layer_scalar,
                next_norm=next_norm,
                eps=eps,
            )
        return out, out_normed


class Gemma4Model(nn.Module):
    """Embeddings, decoder layers, final norm, tied (or separate) lm_head with logit softcapping."""

    def __init__(self, cfg: Gemma4TextConfig, *, backend: OpBackend | None = None):
        super().__init__()
        self.config = cfg
        self.backend = backend or TorchBackend()
        self.parallel: Collectives | None = None  # tensor parallel: vocab-parallel embedding and lm_head
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("embed_tokens", None)
        self.register_buffer("lm_head", None)  # stays None when tied to the embeddings
        # optional FP8 copy of the output projection (see `use_fp8_lm_head`); not part of the checkpoint
        self.register_buffer("lm_head_fp8", None, persistent=False)
        self.register_buffer("lm_head_fp8_scale", None, persistent=False)
        if cfg.hidden_size_per_layer_input:
            n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
            self.register_buffer("embed_tokens_per_layer", None)
            self.per_layer_model_projection = Linear(cfg.hidden_size, (n * p,), backend=self.backend)
            self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def set_backend(self, backend: OpBackend) -> None:
        self.backend = backend
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    def set_parallel(self, group: Collectives | None) -> None:
        """Make this model one rank's shard of a tensor-parallel group (its modules hold that rank's part)."""
        for module in self.modules():
            if hasattr(module, "parallel"):
                module.parallel = group

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=w.dtype)
        if self.parallel is None:
            return F.embedding(input_ids, w) * scale
        # vocab-parallel: this rank's rows give the ids it holds, zeros elsewhere; the sum is the lookup
        local = input_ids - self.parallel.vocab_start
        mine = (local >= 0) & (local < w.shape[0])
        rows = F.embedding(torch.where(mine, local, 0), w).masked_fill(~mine[:, None], 0)
        return self.parallel.all_reduce(rows * scale)

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Per-layer embeddings (E2B/E4B): token table plus a projection of the main embedding, [T, L, P]."""
        cfg = self.config
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        table = self.embed_tokens_per_layer
        tokens = F.embedding(input_ids, table) * torch.tensor(p**0.5, dtype=table.dtype)
        proj = self.per_layer_model_projection(embeds) * (cfg.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(proj.reshape(-1, n, p))
        return (proj + tokens.reshape(-1, n, p)) * (2.0**-0.5)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        ctx: AttentionContext,
        *,
        embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the decoder on flat tokens [T]; returns the final-normed hidden states [T, H].

        `embed_override`: (rows [R], embeddings [R, H]) written over the token embeddings at those rows (image
        soft tokens); as in transformers, those rows count as padding for the per-layer embeddings' token table.
        """
        if embed_override is not None:
            rows, values = embed_override
            input_ids = input_ids.index_fill(0, rows, self.config.pad_token_id)
        h = self.embed(input_ids)
        if embed_override is not None:
            h = h.index_copy(0, rows, values.to(h.dtype))
        ple = self.per_layer_inputs(input_ids, h) if self.config.hidden_size_per_layer_input else None
        # each layer's last launch also norms the next layer's input (the last layer's: the final norm)
        next_norms = [layer.input_layernorm.weight for layer in self.layers[1:]] + [self.norm.weight]
        normed = None  # the first layer norms its own input
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            h, normed = layer.step(h, normed, ctx, None if ple is None else ple[:, i], next_norm=next_norm)
        assert normed is not None, "a model has at least one layer"
        return normed

    def use_fp8_lm_head(self, enabled: bool = True) -> None:
        """Compute logits from an FP8 E4M3 copy (per-row scales) of the output projection: half the bytes of
        the BF16 table that dominates a batch-1 decode step; the BF16 table stays for the embedding lookup."""
        if not enabled:
            self.lm_head_fp8 = self.lm_head_fp8_scale = None
            return
        fp8 = quantize_fp8_rows(self.lm_head if self.lm_head is not None else self.embed_tokens)
        self.lm_head_fp8, self.lm_head_fp8_scale = fp8.data, fp8.scale

    def logits(self, hidden: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 softcapped logits [T, vocab] of the final hidden states, into `out` when given."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        if self.lm_head_fp8 is not None:
            head = FP8RowTensor(self.lm_head_fp8, self.lm_head_fp8_scale)
        logits = self.backend.linear(hidden, head)
        cap = self.config.final_logit_softcapping
        if self.parallel is None:
            return regions(self.backend).softcap_logits(logits, cap, out=out)
        logits = self.parallel.gather_vocab(
            regions(self.backend).softcap_logits(logits, cap), self.config.vocab_size
        )
        return logits if out is None else out.copy_(logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: AttentionContext,
        *,
        logits_at: torch.Tensor | None = None,
        embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (fp32) for the tokens at indices `logits_at` of this step (all tokens when None)."""
        hidden = self.hidden_states(input_ids, ctx, embed_override=embed_override)
        return self.logits(hidden if logits_at is None else hidden[logits_at])
