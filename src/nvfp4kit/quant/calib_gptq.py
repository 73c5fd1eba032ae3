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

from nvfp4kit.formats.nvfp4 import BLOCK, E2M1_MAX, NVFP4Tensor, e2m1_encode, pack_nibbles
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
# Block-scale range of the search that picks the tensor scale (its block scales are then re-chosen in the sweep,
# over BLOCK_GRID): a module attribute so scripts/demo_accuracy.py --set can try others.
TENSOR_SCALE_GRID: tuple[float, ...] = BLOCK_GRID


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factors U of H^-1 = U^T U (after damping) [E, K, K], the form GPTQ's column sweep uses.

    With J the index reversal, J H J = L L^T gives H = R R^T for the upper R = J L J, so U = R^-1 = J L^-1 J:
    one Cholesky and one triangular solve, instead of inverting H and factorising the inverse."""
    h = hessian.flip(-2, -1)  # a copy
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    h += (damping * h.diagonal(dim1=-2, dim2=-1).mean(-1))[:, None, None] * eye
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h)
        bad = info != 0
        if not bool(bad.any()):
            break
        # rank-deficient calibration: damp those harder
        extra = (10.0**attempt) * damping * h.diagonal(dim1=-2, dim2=-1).mean(-1)
        h += torch.where(bad, extra, torch.zeros_like(extra))[:, None, None] * eye
    else:
        raise ValueError("the calibration Hessian is not positive definite even after damping")
    del h
    return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False).flip(-2, -1)


def _feedback_block(
    block_w: torch.Tensor, u_block: torch.Tensor, s2: torch.Tensor, grid: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next 16 columns [E, N, 16] rounded with feedback inside the block, per row with the E4M3 scale of
    least GPTQ loss: every candidate is swept, summing ((w - q) / u_jj)^2 as GPTQ's sweep accrues it, and
    the winner's sweep is kept. Candidates are the distinct E4M3 roundings of amax/6 times `grid`, smallest
    first (ties go to it). Returns the scales [E, N], the codes [E, N, 16] and the scaled errors [E, N, 16]."""
    base = block_w.abs().amax(-1) / (E2M1_MAX * s2[:, None])
    base = torch.where(base.isfinite() & (base > 0), base, torch.ones_like(base))
    first, last, steps = candidate_codes(base, grid)
    candidates = torch.stack([code_scale(first, last, step) for step in range(steps)])  # [C, E, N]
    denom = candidates.float() * s2[:, None]
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    w = block_w.unsqueeze(0).repeat(steps, 1, 1, 1)  # [C, E, N, 16]
    q, err = torch.empty_like(w), torch.empty_like(w)
    negative = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    loss = torch.zeros_like(denom)
    diag = u_block.diagonal(dim1=-2, dim2=-1)[:, None, :]  # [E, 1, 16]
    for j in range(BLOCK):
        scaled = w[..., j] / denom
        q[..., j] = e2m1_round(scaled)
        negative[..., j] = scaled < 0  # e2m1_encode's sign: -0 for small negatives, +0 for -0.0
        err[..., j] = e = (w[..., j] - q[..., j] * denom) / diag[..., j]
        loss += e.pow(2)
        w[..., j:] -= e[..., None] * u_block[:, None, j, j:]
    pick = loss.argmin(0, keepdim=True)  # [1, E, N]
    best = candidates.view(torch.uint8).gather(0, pick)[0].view(torch.float8_e4m3fn)
    rows = pick[..., None].expand(1, *w.shape[1:])
    q, err, negative = (t.gather(0, rows)[0] for t in (q, err, negative))
    codes = e2m1_encode(q.abs()) | (negative.to(torch.uint8) << 3)
    return best, codes, err


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
    Batched: `weight` [E, N, K], `hessian` [E, K, K] and `scale_2` [E] quantize E independent weights (a
    layer's experts) in one sweep, each exactly as alone.
    """
    batched = weight.dim() == 3
    w = (weight if batched else weight.unsqueeze(0)).float().clone()
    h = (hessian if batched else hessian.unsqueeze(0)).float().clone()
    e, n, k = w.shape
    if k % BLOCK or h.shape != (e, k, k):
        raise ValueError(
            f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not fit NVFP4 GPTQ"
        )
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # inputs calibration never saw: quantize them plainly, no feedback
    s2 = scale_2.float().reshape(e)
    u = _inverse_cholesky(h, damping)
    del h
    codes = torch.empty(e, n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, n, k // BLOCK, dtype=torch.float8_e4m3fn, device=w.device)
    for start in range(0, k, SWEEP):
        end = min(start + SWEEP, k)
        window = w[..., start:end].clone()
        errors = torch.empty_like(window)
        u_win = u[:, start:end, start:end]
        for b in range(0, end - start, BLOCK):
            sub, rest = slice(b, b + BLOCK), slice(b + BLOCK, end - start)
            scale, block_codes, err = _feedback_block(window[..., sub], u_win[:, sub, sub], s2, grid)
            scales[..., (start + b) // BLOCK] = scale
            codes[..., start + b : start + b + BLOCK] = block_codes
            errors[..., sub] = err
            if b + BLOCK < end - start:  # the block's error onto the window's later columns
                window[..., rest] -= err @ u_win[:, sub, rest]
        if end < k:
            w[..., end:] -= errors @ u[:, start:end, end:]
    packed, s2 = pack_nibbles(codes), s2.clone()
    if not batched:
        return NVFP4Tensor(packed[0], scales[0], s2.reshape(()))
    return NVFP4Tensor(packed, scales, s2)


def gptq_quantize_group(
    weights: list[torch.Tensor], hessian: torch.Tensor, *, damping: float = DAMPING
) -> list[NVFP4Tensor]:
    """A fused group (same input, one shared tensor scale): searched tensor scale, then GPTQ on all rows.
    Members [N_i, K] with `hessian` [K, K], or E groups at once: [E, N_i, K] with [E, K, K]. Members [N_i, K]
    with `hessian` [G, K, K]: one statistic per group of sum(N_i) / G consecutive rows of the fused weight
    (calib_guided's loss-aware weights per output group); the rows of a group are swept with its own."""
    if weights[0].dim() == 2 and hessian.dim() == 3:
        return _gptq_row_groups(weights, hessian, damping=damping)
    scale_2, _ = search_group(weights, hblocks=hessian_blocks(hessian.float()), block_grid=TENSOR_SCALE_GRID)
    fused = gptq_quantize(
        torch.cat([w.float() for w in weights], dim=-2), hessian, scale_2=scale_2, damping=damping
    )
    return _split(fused, weights)


def _gptq_row_groups(
    weights: list[torch.Tensor], hessian: torch.Tensor, *, damping: float
) -> list[NVFP4Tensor]:
    """GPTQ's rows are independent given H, so row groups go through the batched sweep like experts, all
    with the one tensor scale searched on the mean statistics."""
    h = hessian.float()
    scale_2, _ = search_group(weights, hblocks=hessian_blocks(h.mean(0)), block_grid=TENSOR_SCALE_GRID)
    fused = torch.cat([w.float() for w in weights])
    groups, (n, k) = h.shape[0], fused.shape
    q = gptq_quantize(
        fused.reshape(groups, n // groups, k), h, scale_2=scale_2.expand(groups), damping=damping
    )
    whole = NVFP4Tensor(q.packed.reshape(n, -1), q.scale.reshape(n, -1), scale_2.reshape(()).clone())
    return _split(whole, weights)


def _split(fused: NVFP4Tensor, weights: list[torch.Tensor]) -> list[NVFP4Tensor]:
    """The fused result cut back into the members' rows."""
    out, row = [], 0
    for w in weights:
        rows = slice(row, row + w.shape[-2])
        out.append(NVFP4Tensor(fused.packed[..., rows, :], fused.scale[..., rows, :], fused.scale_2.clone()))
        row += w.shape[-2]
    return out
