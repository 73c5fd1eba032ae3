"""The dense MLP's gate_up projection and its GeGLU, in one launch where the fragment GEMV takes the call.

At decode sizes a step is a chain of latency-bound launches (docs/benchmarks.md, session 15), so the GeGLU's own
launch is folded into the projection before it: where the tuned or heuristic config for this M is the fragment
GEMV (`gemv_mma.py`, SM80+, bf16), `moe_frag.frag_gate_up_geglu` computes both halves and applies
gelu_tanh(gate) * up in registers. Elsewhere (other sizes and tiles, fp16, the CPU interpreter) the projection and
the GeGLU run as two launches. (A GEMV-tile form of the one launch, measured on the H200 in session 16 at
3.183 vs 3.176 ms a batch-1 step, no gain, was removed in session 37.)
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import select_linear_config
from nvfp4kit.kernels.geglu import geglu
from nvfp4kit.kernels.moe_frag import frag_gate_up_geglu, frag_geglu_supported
from nvfp4kit.kernels.w4a16_linear import w4a16_linear


def gate_up_geglu(x: torch.Tensor, weight: NVFP4Tensor) -> torch.Tensor:
    """gelu_tanh(x @ gate^T) * (x @ up^T) for the fused weight [gate | up] ([2I, K]): [T, I] in x.dtype. One
    launch where the fragment GEMV takes this M, else the projection and the GeGLU as two."""
    if frag_geglu_supported(x, weight):
        frag = select_linear_config(x.shape[0], *weight.shape, device=x.device)
        if frag.kernel == "frag":
            return frag_gate_up_geglu(x, weight, k_warps=frag.num_warps, unroll=frag.unroll)
    return geglu(w4a16_linear(x, weight))
