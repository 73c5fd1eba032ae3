"""Two-layer windows for the layer objectives of learned rounding and block-scale tuning.

Layer i's codes or scales are tuned so that the output of the NEXT layer (full precision, never tuned here)
matches the full-precision model's output after layer i+1: the error of layer i is judged by how layer i+1
carries it on, not by its size on the residual stream. With calib_fisher's weights, the weights are the
loss's gradients at layer i+1's output. The last layer, and a layer whose successor reuses an earlier layer's
keys and values (E2B/E4B's shared KV), keep the one-layer objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.model.gemma4 import DecoderLayer
from nvfp4kit.model.loader import fill_layer
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.model.weight_sources import WeightSource
from nvfp4kit.quant.calibrate import CalibrationContext, chunk_samples

LAYERS = 1  # 1: each layer against its own output; 2: against the next layer's output
CHUNK_TOKENS = 8192

# (the tuned layer's output rows, the lengths of their windows, their row indices) -> the next layer's output
After = Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor]


def next_layer_window(
    cfg: Gemma4TextConfig,
    source: WeightSource,
    index: int,
    targets: torch.Tensor,
    per_layer_inputs: torch.Tensor | None,
    lengths: list[int],
    device: torch.device,
) -> tuple[After, torch.Tensor] | None:
    """The full-precision layer `index` + 1 as a function of layer `index`'s output, and its outputs on
    `targets` (the full-precision stream after layer `index`); None where the window stays one layer.
    `per_layer_inputs`: E2B/E4B's per-layer inputs of all layers [T, L, P] (full precision)."""
    following = index + 1
    if LAYERS < 2 or following >= cfg.num_hidden_layers or cfg.kv_source_layer(following) != following:
        return None
    layer = DecoderLayer(cfg, following, TorchBackend())
    fill_layer(layer, source, f"layers.{following}.")
    layer.to(device)
    layer.requires_grad_(False)
    ple = per_layer_inputs[:, following] if per_layer_inputs is not None else None
    out = torch.empty_like(targets)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    with torch.no_grad():
        for c, (a, b) in enumerate(chunk_samples(lengths, max_tokens=CHUNK_TOKENS)):
            sl = slice(offsets[a], offsets[b])
            ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store={}, device=device)
            out[sl] = layer(targets[sl], ctx, ple[sl] if ple is not None else None)

    def after(hidden: torch.Tensor, window_lengths: list[int], rows: torch.Tensor) -> torch.Tensor:
        ctx = CalibrationContext(cfg, window_lengths, chunk=0, kv_store={}, device=device)
        return layer(hidden, ctx, ple[rows] if ple is not None else None)

    return after, out
