"""Error-feedback (GPTQ-style) rounding for NVFP4, from calibration activations.

GPTQ (Frantar et al., 2022) quantizes a weight's input columns left to right and, after each column, moves
its rounding error onto the not yet quantized columns through the inverse of H = X^T X, so the layer's output
XW^T changes as little as possible. For NVFP4 the 16-column blocks are what a scale covers: when the sweep
reaches a block, each row's E4M3 scale is chosen on the *updated* weights by trying every candidate scale
through the block's own 16-column sweep and keeping the one with the least GPTQ loss; then the block's
columns are rounded one by one with feedback. The tensor scale is
the searched one of the original weights. The result is ordinary NVFP4: any engine reads it unchanged.
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import (
    BLOCK,
    E2M1_MAX,
    NVFP4Tensor,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
)
from nvfp4kit.quant.calib_search import (
    BLOCK_GRID,
    candidate_codes,
    code_scale,
    e2m1_round,
    hessian_blocks,
    search_group,
)

DAMPING = (
    0.05  # fraction of mean(diag(H)) added to the diagonal (GPTQ uses 0.01; more generalises better here)
)
SWEEP = 128  # columns updated lazily together (a multiple of the block size)


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after damping), the form GPTQ's column sweep uses."""
    h = hessian.clone()
    h += damping * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:  # rank-deficient calibration: damp harder
            h += (
                (10.0**attempt)
                * damping
                * torch.mean(torch.diag(h))
                * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            )
    else:
        raise ValueError("the calibration Hessian is not positive definite even after damping")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def _feedback_scales(
    block_w: torch.Tensor, u_block: torch.Tensor, s2: torch.Tensor, grid: tuple[float, ...]
) -> torch.Tensor:
    """Per row, the E4M3 scale of the next 16 columns with the least GPTQ loss: each candidate is tried by
    rounding the 16 columns with feedback, summing ((w - q) / u_jj)^2, the loss GPTQ's sweep accrues.
    Candidates are the distinct E4M3 roundings of amax/6 times `grid`, smallest first (ties go to it)."""
    base = block_w.abs().amax(-1) / (E2M1_MAX * s2)
    base = torch.where(base.isfinite() & (base > 0), base, torch.ones_like(base))
    first, last, steps = candidate_codes(base, grid)
    candidates = torch.stack([code_scale(first, last, step) for step in range(steps)])  # [C, N]
    denom = candidates.float() * s2
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    w = block_w.unsqueeze(0).repeat(steps, 1, 1)  # [C, N, 16]
    loss = torch.zeros_like(denom)
    for j in range(BLOCK):
        err = (w[..., j] - e2m1_round(w[..., j] / denom) * denom) / u_block[j, j]
        loss += err.pow(2)
        w[..., j:] -= err[..., None] * u_block[j, j:]
    best = candidates.view(torch.uint8).gather(0, loss.argmin(0, keepdim=True))[0]
    return best.view(torch.float8_e4m3fn)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    scale_2: torch.Tensor,
    damping: float = DAMPING,
    grid: tuple[float, ...] = BLOCK_GRID,
) -> NVFP4Tensor:
    """NVFP4 of `weight` [N, K] with error feedback; `hessian` = sum of c_t x_t x_t^T over calibration inputs.

    Columns go left to right; when the sweep reaches a 16-column block, each row's block scale is chosen
    among `grid` (multiples of amax/6, rounded to E4M3) by the loss the block's rounding with feedback costs.
    """
    n, k = weight.shape
    if k % BLOCK or hessian.shape != (k, k):
        raise ValueError(
            f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not fit NVFP4 GPTQ"
        )
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs calibration never saw: quantize them plainly, no feedback
    h[dead, dead] = 1.0
    s2 = scale_2.float().reshape(())
    u = _inverse_cholesky(h, damping)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float8_e4m3fn, device=w.device)
    for start in range(0, k, SWEEP):
        end = min(start + SWEEP, k)
        block_w = w[:, start:end].clone()
        errors = torch.zeros_like(block_w)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % BLOCK == 0:
                b = col // BLOCK
                sub = slice(i, i + BLOCK)
                scales[:, b] = _feedback_scales(block_w[:, sub], u_block[sub, sub], s2, grid)
                denom = scales[:, b].float() * s2
            column = block_w[:, i]
            code = e2m1_encode(column / denom)
            codes[:, col] = code
            err = (column - e2m1_decode(code) * denom) / u_block[i, i]
            block_w[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return NVFP4Tensor(pack_nibbles(codes), scales, s2.clone())


def gptq_quantize_group(
    weights: list[torch.Tensor], hessian: torch.Tensor, *, damping: float = DAMPING
) -> list[NVFP4Tensor]:
    """A fused group (same input, one shared tensor scale): searched tensor scale, then GPTQ on all rows."""
    scale_2, _ = search_group(weights, hblocks=hessian_blocks(hessian.float()))
    fused = gptq_quantize(
        torch.cat([w.float() for w in weights]),
        hessian,
        scale_2=scale_2,
        damping=damping,
    )
    out, row = [], 0
    for w in weights:
        rows = slice(row, row + w.shape[0])
        out.append(NVFP4Tensor(fused.packed[rows], fused.scale[rows], fused.scale_2.clone()))
        row += w.shape[0]
    return out
