"""The operator seam: the model's heavy ops (linear, MoE experts) go through a named backend.

The `torch` backend runs everywhere (CPU reference, CI); `nvfp4kit.kernels` registers a `triton`
backend for CUDA. A backend is a small object with the methods below; `select_backend` picks one for a
device, and the model keeps the one it was built with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from nvfp4kit.formats.nvfp4 import NVFP4Tensor

Weight = torch.Tensor | NVFP4Tensor


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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """A dense view of a weight in `dtype` (NVFP4 is expanded on the fly, never stored)."""
    if isinstance(weight, NVFP4Tensor):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


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


def _expert(weight: Weight, e: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NVFP4Tensor):
        return weight.expert(e).dequantize(dtype)
    return weight[e].to(dtype)


_BACKENDS: dict[str, Callable[[], OpBackend]] = {"torch": TorchBackend}


def register_backend(name: str, factory: Callable[[], OpBackend]) -> None:
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    _load_plugins()
    return sorted(_BACKENDS)


def _load_plugins() -> None:
    try:  # the Triton kernels register themselves on import when triton is installed
        import nvfp4kit.kernels  # noqa: F401
    except ImportError:
        pass


def select_backend(device: torch.device | str, name: str | None = None) -> OpBackend:
    """`name` if given; else `triton` on CUDA when available, `torch` otherwise."""
    _load_plugins()
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown op backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
