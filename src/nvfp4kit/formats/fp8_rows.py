"""FP8 E4M3 weights with one FP32 scale per output row: the optional copy of the lm_head (W8A16).

The tied lm_head of Gemma 4 is a BF16 [vocab, hidden] table (1.48 GB for 26B-A4B): at batch 1 it is nearly half
the bytes a decode step reads. An FP8 copy with per-row scales halves that, at a small cost in logit accuracy
(measured in docs/benchmarks.md); the BF16 table stays for the embedding lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8RowTensor:
    data: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N]: row n of the weight is data[n] * scale[n]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None]).to(dtype)


def quantize_fp8_rows(weight: torch.Tensor, *, rows_per_chunk: int = 8192) -> FP8RowTensor:
    """Round each row of a [N, K] weight to E4M3 after scaling its largest |value| to 448 (chunked: little memory)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a [N, K] weight, got shape {tuple(weight.shape)}")
    data = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start : start + rows_per_chunk].float()
        amax = rows.abs().amax(dim=1).clamp(min=1e-12)
        s = amax / E4M3_MAX
        data[start : start + rows_per_chunk] = (
            (rows / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        )
        scale[start : start + rows_per_chunk] = s
    return FP8RowTensor(data, scale)
