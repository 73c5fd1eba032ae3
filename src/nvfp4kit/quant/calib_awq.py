"""Activation-aware input-channel scales (AWQ-style) folded into the RMSNorm that feeds a group of linears.

Gemma 4's norms compute x / rms(x) * w (no `1 + w`), so dividing the norm weight w by s per channel and
multiplying the columns of every linear that reads that norm by s leaves the full-precision model unchanged,
but moves where NVFP4's rounding error falls: channels with large activations get relatively larger
weights, hence finer steps inside their 16-weight blocks. Only norms whose output feeds nothing but the
scaled linears are folded: input_layernorm (q/k/v), pre_feedforward_layernorm (the dense MLP's gate/up) and
pre_feedforward_layernorm_2 (every expert's gate/up, one scale for all experts; the router normalises the
residual itself, without a weight, so it is untouched).

The scales are s = m^alpha with m the RMS of each input channel over the calibration tokens, normalised to a
geometric mean of 1, and alpha chosen per group among `ALPHAS` by the measured output error of the quantized
result: tr((W - Q S^-1) H (W - Q S^-1)^T) with H = X^T X of the calibration inputs, Q the group quantizer's
(GPTQ's) result for W S against S^-1 H S^-1. alpha = 0 is s = 1 (no change), so a group is folded only when
that lowers its error. The new norm weight is rounded to its stored dtype (BF16) first and s recomputed from
it, so the checkpoint's norm and the linears' scales agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor

ALPHAS = tuple(round(0.1 * i, 1) for i in range(8))  # 0 .. 0.7: exponents of the channel RMS
FLOOR = 1e-4  # channels quieter than this fraction of the loudest are treated as this quiet

GroupQuantizer = Callable[[list[torch.Tensor], "torch.Tensor | None"], list[NVFP4Tensor]]


def channel_rms(hessian: torch.Tensor) -> torch.Tensor:
    """Per input channel sqrt(diag H) [K] (summed over experts for [E, K, K]): the activations' size, up to
    one common factor that the normalisation removes."""
    diag = hessian.diagonal(dim1=-2, dim2=-1).float()
    if diag.dim() == 2:
        diag = diag.sum(0)
    return diag.clamp(min=0).sqrt()


def fold_into_norm(
    norm_weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / s rounded to `dtype`, in fp32; the s that rounded weight exactly stands for). Channels whose norm
    weight is zero (or rounds to zero) keep s = 1: their input is always zero."""
    w = norm_weight.float()
    folded = (w / scale).to(dtype).float()
    usable = (w != 0) & (folded != 0)
    folded = torch.where(usable, folded, w)
    effective = torch.where(
        usable, w / torch.where(usable, folded, torch.ones_like(folded)), torch.ones_like(w)
    )
    return folded, effective


def scaled_hessian(hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S^-1 H S^-1: the statistics of the inputs x / s."""
    inv = 1.0 / scale
    return hessian * inv[:, None] * inv[None, :]


def output_error(
    weights: list[torch.Tensor], hessian: torch.Tensor, quantized: list[NVFP4Tensor], scale: torch.Tensor
) -> float:
    """sum over members of tr(D H D^T), D = W - dequant(Q) / s (members [N, K] or [E, N, K])."""
    total = 0.0
    for w, q in zip(weights, quantized):
        diff = w.float() - q.dequantize(torch.float32) / scale
        total += float(((diff @ hessian.float()) * diff).sum())
    return total


def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    norm_weight: torch.Tensor,
    quantizer: GroupQuantizer,
    *,
    dtype: torch.dtype = torch.bfloat16,
    alphas: tuple[float, ...] = ALPHAS,
) -> tuple[float, torch.Tensor, torch.Tensor, list[NVFP4Tensor]]:
    """The alpha of least output error for the group `weights` (all reading `norm_weight`'s output) with its
    folded norm weight (fp32, `dtype`-exact), its effective scales s [K] and the quantized members (of W S)."""
    rms = channel_rms(hessian)
    rms = rms.clamp(min=FLOOR * float(rms.max().clamp(min=1e-30)))
    log_rms = rms.log()
    centred = log_rms - log_rms.mean()
    best: tuple[float, float, torch.Tensor, torch.Tensor, list[NVFP4Tensor]] | None = None
    for alpha in alphas:
        folded, scale = fold_into_norm(norm_weight, (alpha * centred).exp(), dtype)
        scale = scale.to(weights[0].device)
        quantized = quantizer([w.float() * scale for w in weights], scaled_hessian(hessian, scale))
        err = output_error(weights, hessian, quantized, scale)
        if best is None or err < best[1]:
            best = (alpha, err, folded, scale, quantized)
    assert best is not None
    alpha, _, folded, scale, quantized = best
    return alpha, folded, scale, quantized
