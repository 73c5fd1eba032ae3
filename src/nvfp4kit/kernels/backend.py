"""The `triton` op backend: NVFP4 linears and the fused MoE through the Triton kernels.

Dense (BF16) linear weights, such as the tied lm_head, go to cuBLAS through `torch.nn.functional.linear`.
Everything here is free of host syncs, so a model built on this backend can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.fused_moe import fused_moe
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.model.ops import Weight


class TritonBackend:
    name = "triton"

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        if isinstance(weight, NVFP4Tensor):
            return w4a16_linear(x, weight)
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))

    def moe(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up: Weight,
        down: Weight,
    ) -> torch.Tensor:
        if not isinstance(gate_up, NVFP4Tensor) and gate_up.dtype != x.dtype:
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
        return fused_moe(x, topk_ids, topk_weights, gate_up, down)
