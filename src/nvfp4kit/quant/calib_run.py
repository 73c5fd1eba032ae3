"""Run one decoder layer over all calibration tokens, a chunk of whole samples at a time (calib_refine's loop).

`run_layer` feeds a layer the calibration stream chunk by chunk (each chunk's keys/values for later layers kept
in a `KVStore`); with a `Twin`, the full-precision copy of the layer runs each chunk first and hands its inputs
to the statistics of the layer being re-quantized (asymmetric calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.model.gemma4 import DecoderLayer
from nvfp4kit.quant.calib_hessian import CaptureBackend, HessianBackend, StageDone
from nvfp4kit.quant.calibrate import CalibrationContext, chunk_samples

CHUNK_TOKENS = 8192
KVStore = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Twin:
    """The full-precision twin of the layer being refined (asymmetric statistics)."""

    layer: DecoderLayer
    capture: CaptureBackend
    backend: HessianBackend  # the refined layer's, which takes the twin's inputs as targets
    hidden: torch.Tensor
    ple: torch.Tensor | None  # E2B/E4B: per-layer inputs through the unquantized projection
    kv_store: KVStore
    out: torch.Tensor | None = None  # its outputs, from a stage that ran the whole layer
    finished: set[int] = field(default_factory=set)  # the chunks `out` holds


@torch.no_grad()
def run_layer(
    layer: DecoderLayer,
    hidden: torch.Tensor,
    per_layer_input: torch.Tensor | None,
    lengths: list[int],
    cfg: Gemma4TextConfig,
    kv_store: KVStore,
    device: torch.device,
    *,
    record: bool = False,
    twin: Twin | None = None,
) -> torch.Tensor | None:
    """The layer's outputs for all calibration tokens, a chunk of whole samples at a time. Keys/values that
    later layers reuse land in `kv_store`; a layer's last run is the one they keep. `record`: only for the
    statistics the backend collects; it may stop each chunk early (StageDone), and nothing is returned.
    `twin`: first run each chunk through the full-precision twin and hand its inputs to the statistics."""
    result = None if record else torch.empty_like(hidden)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    for c, (a, b) in enumerate(chunk_samples(lengths, max_tokens=CHUNK_TOKENS)):
        sl = slice(offsets[a], offsets[b])
        ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store=kv_store, device=device)
        if twin is not None:
            twin.capture.captured = {}
            twin_ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store=twin.kv_store, device=device)
            try:
                y_full = twin.layer(twin.hidden[sl], twin_ctx, twin.ple[sl] if twin.ple is not None else None)
                if twin.out is None:  # a stage that runs the whole layer: the twin's output, kept
                    twin.out = torch.empty_like(twin.hidden)
                twin.out[sl] = y_full
                twin.finished.add(c)
            except StageDone:
                pass
            twin.backend.targets = twin.capture.captured
        if record:
            layer.backend.window = sl
        try:
            y = layer(hidden[sl], ctx, per_layer_input[sl] if per_layer_input is not None else None)
        except StageDone:
            continue
        if result is not None:
            result[sl] = y
    return result
