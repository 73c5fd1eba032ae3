"""Checkpoint weight formats: how a format stores the text tower's weights, behind one small interface.

A `WeightSource` answers three questions by HF module name (without the checkpoint prefix): a linear's
weight (`linear("layers.0.self_attn.q_proj")`, dense or NVFP4), a layer's stacked experts, and a plain
tensor (norms, scales, embeddings). It records every checkpoint key it read, so the loader can report
the ones nobody asked for. The quantized formats are listed in `FORMATS`; the first whose `detect` claims a
folder wins, else the folder is read as dense.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.fp8_rows import FP8RowTensor
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointError, CheckpointReader

# A weight as the model and the op backends take it: dense, NVFP4, or FP8 with a scale per row.
Weight = torch.Tensor | NVFP4Tensor | FP8RowTensor


class WeightSource:
    """Dense (BF16/FP16/FP32) checkpoints as transformers writes them; subclasses add quantized formats."""

    format_name = "dense"

    def __init__(
        self, reader: CheckpointReader, cfg: Gemma4TextConfig, *, dtype: torch.dtype, device: torch.device
    ):
        self.reader = reader
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.consumed: set[str] = set()

    def key(self, name: str) -> str:
        return self.cfg.weight_prefix + name

    def has(self, name: str) -> bool:
        return self.key(name) in self.reader

    def raw(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One checkpoint tensor by module-relative name, on the target device (dtype kept unless given)."""
        key = self.key(name)
        tensor = self.reader.get(key, device=self.device, dtype=dtype)
        self.consumed.add(key)
        return tensor

    def tensor(self, name: str) -> torch.Tensor:
        return self.raw(name, dtype=self.dtype)

    def linear(self, name: str) -> Weight:
        return self.tensor(f"{name}.weight")

    def experts(self, name: str) -> tuple[Weight, Weight]:
        return self.tensor(f"{name}.gate_up_proj"), self.tensor(f"{name}.down_proj")

    def describe(self) -> dict[str, Any]:
        return {"format": self.format_name}

    @staticmethod
    def detect(folder: Path, raw_config: dict[str, Any]) -> bool:
        """Whether `folder` (with config.json `raw_config`) is in this format; may raise on a variant it rejects."""
        return False


# The quantized formats in the order they are tried: name -> "module:WeightSource subclass", imported on first
# use (each lives next to its format's writer and subclasses WeightSource).
FORMATS = {
    "compressed-tensors-nvfp4": "nvfp4kit.formats.compressed_tensors:CompressedTensorsSource",
    "modelopt-nvfp4": "nvfp4kit.formats.modelopt:ModelOptSource",
}


def _source_class(name: str) -> type[WeightSource]:
    module, _, attr = FORMATS[name].partition(":")
    return getattr(import_module(module), attr)  # no optional package: an import error is a bug, and raises


def select_source_class(folder: Path, raw_config: dict[str, Any]) -> type[WeightSource]:
    for name in FORMATS:
        source = _source_class(name)
        if source.detect(folder, raw_config):
            return source
    quant = raw_config.get("quantization_config") or {}
    if quant:
        known = list(FORMATS)
        raise CheckpointError(
            f"{folder}: unsupported quantization {quant.get('quant_method', quant)!r}; supported formats: {known}"
        )
    return WeightSource


def concat_out(weights: list[Weight], *, names: list[str]) -> Weight:
    """Fuse projections along the output dim (q/k/v, gate/up). NVFP4 parts must share weight_scale_2."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights, dim=0)
    if all(isinstance(w, NVFP4Tensor) for w in weights):
        first = weights[0].scale_2
        for w, name in zip(weights[1:], names[1:]):
            if not torch.equal(w.scale_2, first):
                raise CheckpointError(
                    f"{name}.weight_scale_2 differs from {names[0]}.weight_scale_2; fused projections must "
                    "share it (re-export with a tool that unifies q/k/v and gate/up scales)"
                )
        return NVFP4Tensor(
            torch.cat([w.packed for w in weights]), torch.cat([w.scale for w in weights]), first.clone()
        )
    raise CheckpointError(f"{names}: mixed quantized and unquantized weights cannot be fused")
