"""Weights pulled into L2 from a third stream while the kernels before their linear run (decode-sized steps).

A batch-1 decode step on an H100 spends ~82 us a layer against ~17 us of weight bytes: each linear's first
DRAM requests take microseconds to come back, and the kernels between the linears (RoPE, attention, the
router's region, the tail) leave the bus idle. Each point below forks a prefetch stream off the current one
(so the prefetch starts once the kernels launched so far are done), starts `kernels/l2_prefetch.py` on a later
linear's packed weights and scales (the backend's `prefetch_l2`), and leaves: a prefetch changes no value, so nothing waits for it until the
model's forward ends (`join_prefetches`, which CUDA graph capture needs: every forked stream must rejoin).

Points (`NVFP4KIT_L2_PREFETCH`, a comma list; `all`; `0`/empty = off, the default):
  * `o`: once the q/k/v projection is done, the o projection (it runs after RoPE and attention);
  * `mlp`: once the o projection is done, the dense MLP's gate_up and down (after the router's region);
  * `qkv`: once the router's region is done, the next layer's q/k/v projection (after the MLP and experts).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from nvfp4kit.model.branches import MAX_OVERLAP_TOKENS, indexed_device

POINTS = ("o", "mlp", "qkv")
_override: frozenset[str] | None = None
_streams: dict[torch.device, torch.cuda.Stream] = {}
_forked: set[torch.device] = set()


def set_prefetch_points(points: frozenset[str] | set[str] | None) -> None:
    """Force the prefetch points for this process (empty: off); None goes back to `NVFP4KIT_L2_PREFETCH`."""
    global _override
    if points is not None and not set(points) <= set(POINTS):
        raise ValueError(f"prefetch points are {POINTS}, got {sorted(points)}")
    _override = None if points is None else frozenset(points)


def prefetch_points() -> frozenset[str]:
    if _override is not None:
        return _override
    raw = os.environ.get("NVFP4KIT_L2_PREFETCH", "").strip().lower()
    if raw in ("", "0", "off", "false", "no"):
        return frozenset()
    if raw in ("1", "on", "all", "true", "yes"):
        return frozenset(POINTS)
    points = frozenset(p.strip() for p in raw.split(",") if p.strip())
    if not points <= set(POINTS):
        raise ValueError(f"NVFP4KIT_L2_PREFETCH takes a comma list of {POINTS} (or all / 0), got {raw!r}")
    return points


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a linear's kernel reads: NVFP4 packed codes and block scales, or a dense weight."""
    packed = getattr(module, "weight_packed", None)
    if packed is not None:
        return [packed, module.weight_scale]
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) else []


def prefetch(point: str, x: torch.Tensor, backend: object, *modules: nn.Module | None) -> None:
    """At `point` (if on), start pulling the weights of `modules` into L2 from the prefetch stream, through the
    backend's optional `prefetch_l2(tensor)` (the Triton one's; others have none and nothing happens). `x`: the
    step's activations (they name the device and the token count; prefill-sized steps skip this)."""
    prefetch_l2 = getattr(backend, "prefetch_l2", None)
    if (
        prefetch_l2 is None
        or not (x.is_cuda and x.shape[0] <= MAX_OVERLAP_TOKENS)
        or point not in prefetch_points()
    ):
        return
    device = indexed_device(x.device)
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for module in modules:
            for t in weight_tensors(module) if module is not None else ():
                prefetch_l2(t)
    _forked.add(device)


def join_prefetches(x: torch.Tensor) -> None:
    """The current stream waits for the prefetch stream (a no-op without an open fork on this device)."""
    if not x.is_cuda:
        return
    device = indexed_device(x.device)
    if device in _forked:
        torch.cuda.current_stream(device).wait_stream(_streams[device])
        _forked.discard(device)
