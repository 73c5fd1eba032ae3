"""The operator seam: the model's heavy ops and fused element-wise regions go through a named backend.

The `torch` backend runs everywhere (CPU reference, CI); the `triton` backend (`nvfp4kit.kernels.backend`,
a layer above the model, named in the `BACKENDS` table and imported on first use) runs on CUDA. A backend is
a small object with the methods below; `select_backend` picks one for a device, and the model keeps the one it
was built with.

Two groups of methods:
  * `OpBackend`: the heavy ops (linear, MoE experts). Every backend has them.
  * `FusedRegions`: the element-wise regions between them (norms, RoPE, GeGLU, routing), one launch each
    on the GPU. `TorchBackend` computes them with exactly the op order and roundings the model has always
    used (it is the reference the HF-parity tests pin); a backend without them (a calibration recorder that
    only wraps `linear`/`moe`) gets the torch versions through `regions`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from nvfp4kit.formats.fp8_rows import FP8RowTensor
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.weight_source import Weight as Weight  # re-exported: the ops' argument type


class OpBackend(Protocol):
    name: str

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """y = x @ W^T, W dense [N, K] or NVFP4 [N, K]; returns x.dtype."""

    def moe(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up: Weight,
        down: Weight,
    ) -> torch.Tensor:
        """sum_k w_k * down_e(gelu_tanh(gate_e(x)) * up_e(x)); gate_up [E, 2I, H] (gate first), down [E, H, I]."""


@runtime_checkable
class FusedRegions(Protocol):
    """The element-wise regions of a decoder layer; inputs [T, ...] in the compute dtype, outputs the same."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, *, eps: float) -> torch.Tensor:
        """x / rms(x) * weight over the last dim (no weight: plain normalisation)."""

    def ffn_inputs(
        self,
        residual: torch.Tensor,
        attn_out: torch.Tensor,
        *,
        post_attn_norm: torch.Tensor,
        mlp_norm: torch.Tensor,
        experts_norm: torch.Tensor | None,
        router_scale: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The residual h = residual + post_attn_norm(attn_out) and what the FFN takes from it: the dense MLP's
        normed input and, in a MoE layer (experts_norm and router_scale given), the experts' normed input and
        the router's rms_norm(h) * router_scale * H**-0.5; a dense layer gets None for the last two."""

    def ffn_inputs_routed(
        self,
        residual: torch.Tensor,
        attn_out: torch.Tensor,
        *,
        post_attn_norm: torch.Tensor,
        mlp_norm: torch.Tensor,
        experts_norm: torch.Tensor,
        router_scale: torch.Tensor,
        router_weight: Weight,
        per_expert_scale: torch.Tensor,
        top_k: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A MoE layer's `ffn_inputs` followed by `route_tokens` of its router input (which is not returned):
        (h, mlp_in, experts_in, weights fp32 [T, top_k], expert ids int64 [T, top_k]), exactly as the two calls
        give them; a backend may make it one launch (the router's programs recompute the normed rows)."""

    def ffn_tail(
        self,
        h: torch.Tensor,
        mlp_out: torch.Tensor,
        experts_out: torch.Tensor | None,
        *,
        post_norm: torch.Tensor,
        post_mlp_norm: torch.Tensor | None,
        post_experts_norm: torch.Tensor | None,
        layer_scalar: torch.Tensor | None,
        next_norm: torch.Tensor | None = None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, next_norm(out)): out = (h + post_norm(mix)) * layer_scalar, mix = post_mlp_norm(mlp_out) +
        post_experts_norm(experts_out) with experts, else mlp_out; no layer_scalar: not scaled. next_norm is
        the next layer's input norm (or the final norm), so its input comes out of this launch; None: not made."""

    def qkv_norm_rope(
        self,
        qkv: torch.Tensor,
        *,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        q_norm: torch.Tensor,
        k_norm: torch.Tensor | None,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_proj: bool,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """From the fused projection [T, q (+ k (+ v))]: q = rope(q_norm(q)), k = rope(k_norm(k)),
        v = rms_norm(v or, without v_proj, the raw k), each [T, heads, D]; no k_norm: the layer computes no
        K/V and k, v are None. RoPE pairs (i, i + D/2), angle = position * inv_freq[i]."""

    def geglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate) * up for gate_up = [gate | up] along the last dim."""

    def softcap_logits(
        self, logits: torch.Tensor, cap: float | None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp32 cap * tanh(logits / cap) of the lm_head's [B, V] output (no cap: the fp32 copy), into `out`
        (fp32 [B, V]) when given."""

    def route(
        self, logits: torch.Tensor, per_expert_scale: torch.Tensor, *, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax over experts, top-k, renormalise, times per_expert_scale: (weights fp32, ids int64) [T, k]."""

    def route_tokens(
        self, z: torch.Tensor, weight: Weight, per_expert_scale: torch.Tensor, *, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router whole: `route` of the logits z @ weight^T [T, E] (in z.dtype, as `linear` returns them)."""


class Collectives(Protocol):
    """A tensor-parallel group as the model sees it (`nvfp4kit.distributed` runs it on torch.distributed); a
    model without one (None) is the whole model in one process, and every collective below is the identity."""

    rank: int
    world_size: int
    vocab_start: int  # the first vocab row this rank's embedding / lm_head shard holds

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of every rank's `x`, on every rank."""

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's logits [T, its vocab rows] side by side, in rank order: [T, vocab_size]."""


def all_reduce(x: torch.Tensor, group: Collectives | None) -> torch.Tensor:
    return x if group is None else group.all_reduce(x)


def all_reduce_parts(
    parts: tuple[torch.Tensor | None, ...], group: Collectives | None
) -> tuple[torch.Tensor | None, ...]:
    """Several partial sums [T, *] reduced in one collective (side by side, summed, split back)."""
    if group is None:
        return parts
    present = [p for p in parts if p is not None]
    summed = group.all_reduce(torch.cat(present, dim=-1) if len(present) > 1 else present[0])
    pieces = iter(summed.split([p.shape[-1] for p in present], dim=-1))
    return tuple(None if p is None else next(pieces) for p in parts)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """A dense view of a weight in `dtype`: NVFP4 and FP8 are expanded on each call, unless a copy was kept
    (`model.layers.keep_dense_weights`, CPU inference)."""
    if isinstance(weight, (NVFP4Tensor, FP8RowTensor)):
        kept = weight.__dict__.get("_dense")
        if kept is not None and kept.dtype == dtype:
            return kept
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) * w in fp32, rounded once to x.dtype (Gemma 4 uses plain `x * w`, not Gemma 3's `1 + w`)."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.to(x.dtype)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]; neox pairing (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class TorchBackend:
    """Reference implementation with plain torch ops; W4A16: NVFP4 weights expand to x.dtype per call."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        return F.linear(x, dense(weight, x.dtype))

    def moe(self, x, topk_ids, topk_weights, gate_up, down):
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        num_experts = gate_up.shape[0]
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
        token_of = order // topk_ids.shape[1]
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start : start + count]
            tokens = token_of[start : start + count]
            start += count
            h = F.linear(x[tokens], _expert(gate_up, e, x.dtype))
            gate, up = h.chunk(2, dim=-1)
            y = F.linear(gelu_tanh(gate) * up, _expert(down, e, x.dtype))
            w = topk_weights.reshape(-1)[slots].to(torch.float32)
            out.index_add_(0, tokens, y.float() * w[:, None])
        return out.to(x.dtype)

    # ---- fused regions: the model's own op order, roundings included -------------------------------

    def rms_norm(self, x, weight, *, eps):
        return rms_norm(x, weight, eps)

    def ffn_inputs(self, residual, attn_out, *, post_attn_norm, mlp_norm, experts_norm, router_scale, eps):
        h = residual + rms_norm(attn_out, post_attn_norm, eps)
        if experts_norm is None:
            return h, rms_norm(h, mlp_norm, eps), None, None
        router_in = rms_norm(h, None, eps) * router_scale * h.shape[-1] ** -0.5
        return h, rms_norm(h, mlp_norm, eps), rms_norm(h, experts_norm, eps), router_in

    def ffn_inputs_routed(
        self,
        residual,
        attn_out,
        *,
        post_attn_norm,
        mlp_norm,
        experts_norm,
        router_scale,
        router_weight,
        per_expert_scale,
        top_k,
        eps,
    ):
        h, mlp_in, experts_in, router_in = self.ffn_inputs(
            residual,
            attn_out,
            post_attn_norm=post_attn_norm,
            mlp_norm=mlp_norm,
            experts_norm=experts_norm,
            router_scale=router_scale,
            eps=eps,
        )
        weights, ids = self.route_tokens(router_in, router_weight, per_expert_scale, top_k=top_k)
        return h, mlp_in, experts_in, weights, ids

    def ffn_tail(
        self,
        h,
        mlp_out,
        experts_out,
        *,
        post_norm,
        post_mlp_norm,
        post_experts_norm,
        layer_scalar,
        next_norm=None,
        eps,
    ):
        mix = mlp_out
        if experts_out is not None:
            mix = rms_norm(mlp_out, post_mlp_norm, eps) + rms_norm(experts_out, post_experts_norm, eps)
        out = h + rms_norm(mix, post_norm, eps)
        out = out if layer_scalar is None else out * layer_scalar.to(out.dtype)
        return out, None if next_norm is None else rms_norm(out, next_norm, eps)

    def qkv_norm_rope(
        self, qkv, *, positions, inv_freq, q_norm, k_norm, num_heads, num_kv_heads, head_dim, v_proj, eps
    ):
        t = qkv.shape[0]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        cos, sin = rope_cos_sin(inv_freq, positions, qkv.dtype)
        q = apply_rope(rms_norm(qkv[:, :q_size].view(t, num_heads, head_dim), q_norm, eps), cos, sin)
        if k_norm is None:
            return q, None, None
        raw_k = qkv[:, q_size : q_size + kv_size].view(t, num_kv_heads, head_dim)
        raw_v = qkv[:, q_size + kv_size :].view(t, num_kv_heads, head_dim) if v_proj else raw_k
        return q, apply_rope(rms_norm(raw_k, k_norm, eps), cos, sin), rms_norm(raw_v, None, eps)

    def geglu(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return gelu_tanh(gate.contiguous()) * up  # contiguous: the same rounding as transformers

    def softcap_logits(self, logits, cap, *, out=None):
        logits = logits.float()
        logits = torch.tanh(logits / cap) * cap if cap else logits
        return logits if out is None else out.copy_(logits)

    def route(self, logits, per_expert_scale, *, top_k):
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * per_expert_scale[ids], ids

    def route_tokens(self, z, weight, per_expert_scale, *, top_k):
        return self.route(self.linear(z, weight), per_expert_scale, top_k=top_k)


def _expert(weight: Weight, e: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NVFP4Tensor):
        kept = weight.__dict__.get("_dense")
        if kept is not None and kept.dtype == dtype:
            return kept[e]
        return weight.expert(e).dequantize(dtype)
    return weight[e].to(dtype)


_TORCH_REGIONS = TorchBackend()
_HAS_REGIONS: dict[type, bool] = {}


def regions(backend: OpBackend) -> FusedRegions:
    """`backend` itself when it implements the fused regions, else the torch reference ones."""
    kind = type(backend)
    has = _HAS_REGIONS.get(kind)
    if has is None:
        has = _HAS_REGIONS[kind] = isinstance(backend, FusedRegions)
    return backend if has else _TORCH_REGIONS  # type: ignore[return-value]


# name -> (the backend's factory, the optional package it needs): the factory is a class defined here, or
# "module:attr" imported on first use.
BACKENDS: dict[str, tuple[Callable[[], OpBackend] | str, str | None]] = {
    "torch": (TorchBackend, None),
    "triton": ("nvfp4kit.kernels.backend:TritonBackend", "triton"),
}


def missing_package(err: ModuleNotFoundError, package: str | None) -> bool:
    """Whether `err` says that `package` (an optional dependency) is not installed, as opposed to a bug."""
    return package is not None and err.name is not None and err.name.split(".")[0] == package


def _factory(name: str) -> Callable[[], OpBackend] | None:
    """The factory of backend `name`, or None when its optional package is not installed (any other import
    error is a bug and raises)."""
    factory, package = BACKENDS[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(import_module(module), attr)
        except ModuleNotFoundError as err:
            if not missing_package(err, package):
                raise
            return None
    return factory


def available_backends() -> list[str]:
    return sorted(name for name in BACKENDS if _factory(name) is not None)


def select_backend(device: torch.device | str, name: str | None = None) -> OpBackend:
    """`name` if given; else `triton` on CUDA when available, `torch` otherwise."""
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" and _factory("triton") is not None else "torch"
    factory = _factory(name) if name in BACKENDS else None
    if factory is None:
        raise ValueError(f"unknown op backend {name!r}; available: {available_backends()}")
    return factory()
