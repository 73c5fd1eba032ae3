"""Asymmetric calibration: quantize each linear so that Q x_q matches W x_full, not W x_q.

The refine pass feeds each layer the outputs of the layers already re-quantized (x_q), so GPTQ minimises
sum_t c_t ||(W - Q) x_q,t||^2 and cannot see the error the earlier layers left. Running the full-precision
model beside it (x_full, same tokens) the objective becomes sum_t c_t ||W x_full,t - Q x_q,t||^2
= tr((Q - W') H (Q - W')^T) + const with H = sum c x_q x_q^T, A = sum c x_full x_q^T and W' = W A H^-1:
ordinary GPTQ (or scale search) of the corrected weight W' against H. Written W' = W + W (A - H) H_d^-1 with
H_d damped as GPTQ damps it, so W' = W exactly when the two streams agree. Only half the correction is
applied (`STRENGTH`): the full one fits the calibration tokens too closely (measured on the demo model).
"""

from __future__ import annotations

import torch

from nvfp4kit.quant.calib_gptq import DAMPING

# fraction of the correction applied; demo model KL: 0.25 0.0544, 0.5 0.0528, 0.75 0.0529, 1 0.0547
STRENGTH = 0.5


def corrected_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor,
    *,
    damping: float = DAMPING,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' for `weight` [N, K] (or [E, N, K] with [E, K, K] statistics); `keep` [E] bool leaves those experts'
    weights as they are (too few tokens for a trustworthy correction)."""
    batched = weight.dim() == 3
    w = weight.float() if batched else weight.float().unsqueeze(0)
    h = (hessian if batched else hessian.unsqueeze(0)).float()
    a = (cross if batched else cross.unsqueeze(0)).float()
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    diag = h.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1)
    damped = h + (damping * torch.where(mean > 0, mean, torch.ones_like(mean)))[:, None, None] * eye
    damped.diagonal(dim1=-2, dim2=-1).clamp_(min=1e-12)
    lower, info = torch.linalg.cholesky_ex(damped)
    # (A - H) H_d^-1 = (H_d^-1 (A - H)^T)^T, H_d symmetric
    delta = torch.cholesky_solve((a - h).transpose(-2, -1), lower).transpose(-2, -1)
    ok = info == 0
    if keep is not None:
        ok &= ~keep.to(ok.device)
    out = w + torch.where(ok[:, None, None], STRENGTH * (w @ delta), torch.zeros_like(w))
    return out if batched else out[0]
