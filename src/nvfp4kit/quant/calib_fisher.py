"""The layer objective weighted by the loss's gradients at the layer's output (Fisher at the decoder layer).

Learned rounding (calib_round) and block-scale tuning (calib_block) fit a whole decoder layer so that its output
h_q on the re-quantized stream matches the full-precision layer's output h. Their plain objective, the mean
of (h_q - h)^2, counts every channel of every token the same, and on the demo model a lower value of it did
not mean a lower KL (accuracy.md, sixth round). To second order, what the model's loss sees of an error
e_t = h_q,t - h_t is e_t^T F_t e_t, F_t the Fisher information at that output; with labels drawn from the
model itself, F_t = E[g_t g_t^T] for g_t the loss's gradient at h_t. One draw per token gives:

- `"diagonal"` (the default): sum_t sum_c g_{t,c}^2 e_{t,c}^2, the diagonal of the one-draw estimate, each
  weight capped at CLIP times the mean (one channel of one token must not decide a layer);
- `"projected"`: sum_t (g_t . e_t)^2, the one-draw estimate itself (rank one per token: an error orthogonal
  to the one drawn gradient costs nothing, so it leans on that single draw much more).

The gradients come from calib_guided's backward pass (`token_sensitivities(..., layer_gradients=[])`), scaled
to a mean square of 1 per layer, so with the diagonal form the objective is on the plain MSE's scale.
With all gradients zero the objective is zero everywhere, and the tuning keeps its starting point.
"""

from __future__ import annotations

import torch

FORMS = ("diagonal", "projected")
FORM = "diagonal"
CLIP = 100.0  # cap of one weight g^2 (the layer's mean square of g is 1)


def fisher_error(out: torch.Tensor, target: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """The gradient-weighted error of `out` [T, H] against `target` [T, H], `gradients` [T, H] the loss's
    gradient at the full-precision output of each token (any float dtype)."""
    if FORM not in FORMS:
        raise ValueError(f"calib_fisher.FORM must be one of {', '.join(FORMS)}, got {FORM!r}")
    error = out.float() - target.float()
    g = gradients.float()
    if FORM == "projected":
        return (error * g).sum(-1).pow(2).mean()
    return (error.pow(2) * g.pow(2).clamp(max=CLIP)).mean()
