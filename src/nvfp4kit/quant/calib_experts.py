"""All experts of a MoE layer re-quantized together: one batched solve instead of a loop over 128 experts.

The calibration forward (calib_hessian) sums each expert's X^T X over the tokens routed to it into one
[E, K, K] tensor per projection and counts those tokens. Here the experts go through the method's group
quantizer as [E, N, K] weights with [E, K, K] statistics (scale search, Cholesky factors and GPTQ's sweep
are all batched over experts), as many at a time as fit: `EXPERT_BATCH` elements of [E, K, K] on a CPU, on a
GPU what its free memory holds (all 128 experts of 26B-A4B on an H200, fewer on a 24 GB card).
Each expert's result is exactly what it gets alone (tests/quant/test_calib_experts.py).

Experts that saw few calibration tokens: with t routed tokens and K inputs, X^T X has rank at most t, and
for t < K GPTQ would fit the error into directions the calibration never probed. Their statistics are shrunk
towards the identity: H + (1 - t/K) mean(diag H) I, so the fewer the tokens the more the choice follows plain
weight error; an expert no token reached (H = 0) is quantized on weight error alone (H = I): searched block and
tensor scales (over the data-driven methods' block-scale range, `calib_search.BLOCK_GRID`), round to nearest.
Experts with t >= K are untouched.
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.quant.calib_methods import GroupQuantizer

EXPERT_BATCH = 2**30  # most elements of a [E, K, K] batch solved at once (4 GiB fp32: 128 experts of 2816)
GPU_SHARE = 0.7  # of the free GPU memory a batch may take


def experts_per_batch(experts: int, rows: int, k: int, device: torch.device) -> int:
    """How many experts to solve at once. The solve holds about six [K, K] and ten [rows, K] fp32 temporaries
    per expert (Hessian copies, Cholesky factor, scale-search candidates)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_expert = 4 * (6 * k * k + 10 * rows * k)
        return max(1, min(experts, int(free * GPU_SHARE) // per_expert))
    return max(1, min(experts, EXPERT_BATCH // (k * k)))


def shrink_few_tokens(hessians: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The few-token fallback above, in place on `hessians` [E, K, K] given routed token counts [E]."""
    k = hessians.shape[-1]
    diag = hessians.diagonal(dim1=-2, dim2=-1)
    shrink = (1.0 - tokens.to(hessians.device, torch.float32) / k).clamp(min=0.0)
    mean = diag.mean(-1)
    few = (shrink > 0) & (mean > 0)
    if bool(few.any()):
        diag[few] += (shrink * mean)[few][:, None]
    empty = ~(mean > 0)  # no token, or only all-zero inputs
    if bool(empty.any()):
        hessians[empty] = torch.eye(k, dtype=hessians.dtype, device=hessians.device)
    return hessians


def refine_experts(
    quantizer: GroupQuantizer,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    hessian_gate_up: torch.Tensor | None,
    hessian_down: torch.Tensor | None,
    tokens: torch.Tensor | None,
) -> tuple[NVFP4Tensor, NVFP4Tensor, NVFP4Tensor]:
    """gate, up and down of every expert ([E, I, H], [E, I, H], [E, H, I] NVFP4 with scale_2 [E]) through the
    group `quantizer`; gate and up of an expert share one tensor scale. Hessians None: data-free methods."""
    experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if tokens is not None:
        for h in (hessian_gate_up, hessian_down):
            if h is not None:
                shrink_few_tokens(h, tokens)
    parts: list[list[NVFP4Tensor]] = [[], [], []]
    step = experts_per_batch(experts, gate_up.shape[1], gate_up.shape[-1], gate_up.device)
    for a in range(0, experts, step):
        sl = slice(a, min(a + step, experts))
        h_gu = hessian_gate_up[sl] if hessian_gate_up is not None else None
        h_dn = hessian_down[sl] if hessian_down is not None else None
        gate, up = quantizer([gate_up[sl, :inter], gate_up[sl, inter:]], h_gu)
        (dn,) = quantizer([down[sl]], h_dn)
        for out, q in zip(parts, (gate, up, dn)):
            out.append(q)
    gate_q, up_q, down_q = (_cat(p) for p in parts)
    return gate_q, up_q, down_q


def _cat(parts: list[NVFP4Tensor]) -> NVFP4Tensor:
    if len(parts) == 1:
        return parts[0]
    return NVFP4Tensor(*(torch.cat([getattr(p, f) for p in parts]) for f in ("packed", "scale", "scale_2")))
