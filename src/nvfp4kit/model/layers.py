"""Building blocks of the Gemma 4 decoder: weights-agnostic linear, RMSNorm, RoPE, attention math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4kit.config import RopeConfig
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.model.ops import OpBackend, TorchBackend, Weight, rms_norm
from nvfp4kit.model.ops import apply_rope as apply_rope  # re-exported: the engine and tests import them here
from nvfp4kit.model.ops import rope_cos_sin as rope_cos_sin

_PARTS = ("packed", "scale", "scale_2")


def store_weight(module: nn.Module, name: str, weight: Weight, *, shape: tuple[int, ...]) -> None:
    """Keep a weight as buffers of `module`: `name` when dense, `name_packed/_scale/_scale_2` when NVFP4."""
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(weight.shape)}, expected {tuple(shape)}")
    quantized = isinstance(weight, NVFP4Tensor)
    module.register_buffer(name, None if quantized else weight)
    for part in _PARTS:
        module.register_buffer(f"{name}_{part}", getattr(weight, part) if quantized else None)


def stored_weight(module: nn.Module, name: str) -> Weight:
    """The weight `store_weight` kept. An NVFP4 weight is one object for as long as its buffers are the same
    tensors (`module.to(...)` replaces them), so what it caches (`NVFP4Tensor.kernel_operands`) lasts."""
    packed = getattr(module, f"{name}_packed", None)
    if packed is not None:
        scale, scale_2 = getattr(module, f"{name}_scale"), getattr(module, f"{name}_scale_2")
        views = module.__dict__.setdefault("_nvfp4_views", {})
        have = views.get(name)
        if (
            have is None
            or have.packed is not packed
            or have.scale is not scale
            or have.scale_2 is not scale_2
        ):
            have = views[name] = NVFP4Tensor(packed, scale, scale_2)
        return have
    dense = getattr(module, name, None)
    if dense is None:
        raise RuntimeError(f"{type(module).__name__}.{name} has no weight loaded")
    return dense


def keep_dense_weights(
    model: nn.Module, dtype: torch.dtype, *, limit_bytes: int, linears_only: bool = False
) -> int:
    """Expand every NVFP4 weight of `model` once and keep the copy, so the torch backend stops expanding them on
    each call (on a CPU that is most of a decode step's time: the demo model decodes ~3x faster). Only when all
    copies fit in `limit_bytes`; returns the bytes kept (0: nothing kept). The copies live on the weights that
    `stored_weight` returns, so a weight replaced later (new buffers) is expanded per call again.

    `linears_only`: the `Linear` modules' weights (attention, dense MLP), not the experts: on a GPU, copies
    that cuBLAS reads for steps of many tokens (`kernels.w4a16_linear`, `linear_copy_bytes`)."""
    weights = [
        stored_weight(module, buffer[: -len("_packed")])
        for module in model.modules()
        if isinstance(module, Linear) or not linears_only
        for buffer, value in module.named_buffers(recurse=False)
        if buffer.endswith("_packed") and value is not None
    ]
    total = sum(w.packed.numel() * 2 * dtype.itemsize for w in weights)
    if not weights or total > limit_bytes:
        return 0
    for w in weights:
        w.__dict__["_dense"] = w.dequantize(dtype)
    return total


class Linear(nn.Module):
    """y = x @ W^T without bias; W dense (compute dtype) or NVFP4 (packed), see `store_weight`.

    Several projections can be fused along the output dim (`splits`), e.g. q/k/v, so one launch does all.
    """

    def __init__(self, in_features: int, splits: tuple[int, ...], *, backend: OpBackend | None = None):
        super().__init__()
        self.in_features = in_features
        self.splits = tuple(splits)
        self.out_features = sum(self.splits)
        self.backend: OpBackend = backend or TorchBackend()

    def set_weight(self, weight: Weight) -> None:
        store_weight(self, "weight", weight, shape=(self.out_features, self.in_features))

    @property
    def quantized(self) -> bool:
        return getattr(self, "weight_packed", None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, stored_weight(self, "weight"))


class RMSNorm(nn.Module):
    """x / rms(x) * w in fp32 (Gemma 4 uses plain `x * w`, not Gemma 3's `1 + w`); no weight for v_norm/router."""

    def __init__(self, dim: int, eps: float, *, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies over head_dim/2 pairs.

    Proportional RoPE (global layers) rotates only the first `partial * head_dim / 2` pairs, but with exponents
    over the full head_dim, and leaves the rest as identity (frequency 0): pairs are (i, i + head_dim/2).
    """
    if rope.rope_type == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
    else:
        angles = head_dim // 2
    exps = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (rope.theta**exps)
    return torch.cat([inv, torch.zeros(head_dim // 2 - angles)])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    window: int | None,
    bidirectional: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention with scale 1.0, for one sequence.

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; a query at position p sees keys at positions p - window < pk <= p.
    `bidirectional`: [start, end) position spans (one image's soft tokens) inside which a query also sees the
    later keys of its span (still within the window), as Gemma 4 does for images on sliding layers.
    """
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    qh = q.transpose(0, 1)  # [Hq, Tq, D]
    kh = k.transpose(0, 1).repeat_interleave(rep, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(rep, dim=0)
    scores = torch.matmul(qh, kh.transpose(1, 2))  # scaling is 1.0: q and k are RMS-normalised
    diff = q_positions[:, None] - k_positions[None, :]
    allowed = diff >= 0
    for a, b in bidirectional:
        allowed |= ((q_positions >= a) & (q_positions < b))[:, None] & (
            (k_positions >= a) & (k_positions < b)
        )
    if window is not None:
        allowed &= diff < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vh).transpose(0, 1)  # [Tq, Hq, D]
