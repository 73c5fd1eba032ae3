"""Better NVFP4 scales at the same format: per-block scale search and a searched global scale.

Max calibration sets each block's FP8 scale to amax/6 (rounded to E4M3) and the tensor scale to amax/2688.
Neither is what minimises the error: a slightly smaller block scale clips the largest value a little but
rounds the other 15 more finely, and the tensor scale decides where every block scale lands on the coarse
E4M3 grid. Here each block tries a grid of scales around amax/6 (each rounded to E4M3, as stored) and keeps
the one with the least error; the tensor scale is searched over one octave (the E4M3 grid repeats every
factor of two). Error is either plain weight MSE or, given calibration activations, the output error of the
block: d^T H_b d with H_b the 16x16 block of the input second-moment matrix X^T X (the block-diagonal part
of ||X W^T - X Q^T||^2). The result is ordinary NVFP4: codes, E4M3 block scales, one FP32 tensor scale.
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import BLOCK, E2M1_MAX, E4M3_MAX, SCALE_MIN, NVFP4Tensor
from nvfp4kit.formats.nvfp4 import global_scale as max_global_scale
from nvfp4kit.formats.nvfp4 import quantize as quantize_with_scales

# Block-scale candidates, as multiples of the max scale amax/6; after E4M3 rounding a few coincide.
BLOCK_GRID = tuple(round(0.70 + 0.025 * i, 3) for i in range(17))  # 0.70 .. 1.10, 1.0 exactly included
# Tensor-scale candidates: multiples of amax/2688 over one octave (below 1 the largest blocks saturate).
GLOBAL_GRID = tuple(2.0 ** (j / 8) for j in range(-2, 8))


def hessian_blocks(hessian: torch.Tensor) -> torch.Tensor:
    """The 16x16 diagonal blocks [K/16, 16, 16] of an input second-moment matrix [K, K]."""
    k = hessian.shape[0]
    if hessian.shape != (k, k) or k % BLOCK:
        raise ValueError(
            f"expected a square [K, K] matrix with K a multiple of {BLOCK}, got {tuple(hessian.shape)}"
        )
    idx = torch.arange(k // BLOCK, device=hessian.device)
    return hessian.view(k // BLOCK, BLOCK, k // BLOCK, BLOCK)[idx, :, idx, :]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the E2M1 grid (round half to even, saturating at 6): the value `e2m1_encode` stores, computed
    arithmetically (steps of 0.5 below 2, 1 below 4, 2 up to 6) because the search runs it many times."""
    a = x.abs().clamp(max=E2M1_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(q, x)


def _fake_quant(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """blocks [N, B, 16] fp32 through E2M1 with per-block fp32 scales [N, B] (already times scale_2)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return e2m1_round(blocks / safe[..., None]) * safe[..., None]


def _block_error(diff: torch.Tensor, hblocks: torch.Tensor | None) -> torch.Tensor:
    if hblocks is None:
        return diff.pow(2).sum(-1)
    return torch.einsum("nbi,bij,nbj->nb", diff, hblocks, diff)


def _to_e4m3(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


def search_block_scales(
    weight: torch.Tensor,
    scale_2: torch.Tensor,
    *,
    hblocks: torch.Tensor | None = None,
    grid: tuple[float, ...] = BLOCK_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best E4M3 scale per block [N, K/16] of `weight` [N, K] for a fixed tensor scale; also its error [N, K/16]."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // BLOCK, BLOCK)
    s2 = scale_2.float().reshape(())
    base = blocks.abs().amax(-1) / (E2M1_MAX * s2)
    base = torch.where(base == 0, torch.ones_like(base), base)
    best_scale = best_err = None
    for mult in grid:
        scale = _to_e4m3(base * mult)
        err = _block_error(_fake_quant(blocks, scale.float() * s2) - blocks, hblocks)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    assert best_scale is not None and best_err is not None
    return best_scale, best_err


def search_group(
    weights: list[torch.Tensor],
    *,
    hblocks: torch.Tensor | None = None,
    block_grid: tuple[float, ...] = BLOCK_GRID,
    global_grid: tuple[float, ...] = GLOBAL_GRID,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One shared tensor scale for a fused group (q/k/v, gate/up; they read the same input, so share `hblocks`)
    and each member's block scales: the tensor-scale candidate with the least total error wins."""
    amax = torch.stack([w.float().abs().amax() for w in weights]).amax()
    base = max_global_scale(amax)
    best: tuple[float, torch.Tensor, list[torch.Tensor]] | None = None
    for mult in global_grid:
        scale_2 = base * mult
        found = [search_block_scales(w, scale_2, hblocks=hblocks, grid=block_grid) for w in weights]
        total = float(sum(err.double().sum() for _, err in found))
        if best is None or total < best[0]:
            best = (total, scale_2, [scale for scale, _ in found])
    assert best is not None
    return best[1], best[2]


def quantize_group_searched(
    weights: list[torch.Tensor],
    *,
    hessian: torch.Tensor | None = None,
    search_global: bool = True,
) -> list[NVFP4Tensor]:
    """NVFP4 of each member of a fused group with searched scales (weight MSE, or output error given X^T X)."""
    hblocks = hessian_blocks(hessian.float()) if hessian is not None else None
    scale_2, scales = search_group(
        weights, hblocks=hblocks, global_grid=GLOBAL_GRID if search_global else (1.0,)
    )
    return [quantize_with_scales(w, scale_2=scale_2, block_scale=s) for w, s in zip(weights, scales)]


def weight_error(weight: torch.Tensor, q: NVFP4Tensor, *, hessian: torch.Tensor | None = None) -> float:
    """||W - Q||^2, or the output error tr((W-Q) H (W-Q)^T) when given H = X^T X."""
    diff = weight.float() - q.dequantize(torch.float32)
    if hessian is None:
        return float(diff.pow(2).sum())
    return float(torch.einsum("ni,ij,nj->", diff, hessian.float(), diff))
