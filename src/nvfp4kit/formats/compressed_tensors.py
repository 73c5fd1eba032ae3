"""Reading compressed-tensors `nvfp4-pack-quantized` checkpoints (llm-compressor's NVFP4 format).

Same bytes as ModelOpt's format under other names, and with the tensor-wide scales inverted:
`<m>.weight_packed` (uint8 [N, K/2], even element in the low nibble), `<m>.weight_scale` (float8_e4m3fn
[N, K/16]), `<m>.weight_global_scale` (fp32 [1], the *encode* multiplier 2688/amax, so
weight_scale_2 = 1 / weight_global_scale) and, for W4A4, `<m>.input_global_scale` (likewise inverted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nvfp4kit.formats.modelopt import ModelOptSource
from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.formats.weight_source import Weight

CT_FORMAT = "nvfp4-pack-quantized"


def ct_quantization_config(raw_config: dict[str, Any]) -> dict[str, Any] | None:
    qc = raw_config.get("quantization_config") or (raw_config.get("text_config") or {}).get(
        "quantization_config"
    )
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        return qc
    return None


def _formats(qc: dict[str, Any]) -> set[str]:
    found = {qc["format"]} if qc.get("format") else set()
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and group.get("format"):
            found.add(group["format"])
    return found


class CompressedTensorsSource(ModelOptSource):
    """`weight_packed` + `weight_scale` + inverted `weight_global_scale` -> the same `NVFP4Tensor`."""

    format_name = "compressed-tensors-nvfp4"
    packed_suffix = "weight_packed"

    @staticmethod
    def detect(folder: Path, raw_config: dict[str, Any]) -> bool:
        qc = ct_quantization_config(raw_config)
        if qc is None:
            return False
        formats = _formats(qc)
        unsupported = sorted(formats - {CT_FORMAT, "dense"})
        if unsupported or not formats:
            raise CheckpointError(
                f"{folder}: compressed-tensors format {unsupported or 'unknown'} is not supported; only {CT_FORMAT!r}"
            )
        return True

    def linear(self, name: str) -> Weight:
        if not self.has(f"{name}.weight_packed"):
            return super().linear(name)  # a module left unquantized (listed in `ignore`)
        weight = self.nvfp4(name)
        self._consume_extras(name)
        return weight

    def global_scale(self, name: str) -> torch.Tensor:
        encode = self.raw(f"{name}.weight_global_scale", dtype=torch.float32)
        if encode.numel() != 1:
            raise CheckpointError(
                f"{self.key(name)}.weight_global_scale must hold one value, got shape {tuple(encode.shape)}"
            )
        if not bool(torch.isfinite(encode).all()) or float(encode) <= 0:
            raise CheckpointError(f"{self.key(name)}.weight_global_scale is {float(encode)}; expected > 0")
        return (1.0 / encode).reshape(())
