"""Decoder-layer reconstruction of the FP8 block scales: after GPTQ (or learned rounding) has written a
layer, tune the E4M3 block scales of ALL its NVFP4 linears jointly (attention, dense MLP, every expert with
the layer's real routing) so that the layer's output on the re-quantized stream matches the full-precision
layer's output on the full-precision stream, so each layer also corrects the error it inherits.

Each block scale moves as s0 * exp(g), g learned by Adam on the output MSE; the forward pass always uses the
scale rounded to E4M3 as it will be stored, the gradient passes straight through that rounding. Two ways to
treat the codes: kept as GPTQ chose them (`reround=False`), or re-rounded after every update to the E2M1
value nearest to GPTQ's dequantized weight under the new scale (`reround=True`, LSQ's straight-through
gradient); at g = 0 both give GPTQ's weights bit for bit. Tensor scales stay, so the result is plain NVFP4
with exactly the tensors, shapes and dtypes the export had. An expert no calibration token reaches gets no
gradient, so its scales stay where GPTQ put them. As in calib_round, every `HOLDOUT`-th calibration window
never trains and picks the checkpoint (the starting point included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.nvfp4 import BLOCK, E4M3_MAX, SCALE_MIN, e2m1_decode, e2m1_encode, pack_nibbles
from nvfp4kit.model.gemma4 import DecoderLayer
from nvfp4kit.quant.calib_fisher import fisher_error
from nvfp4kit.quant.calib_round import (
    Member,
    RoundingBackend,
    RoundingSlot,
    apply_rounding,
    layer_slots,
    window_split,
)
from nvfp4kit.quant.calib_window import After
from nvfp4kit.quant.calibrate import CalibrationContext

STEPS = 200  # Adam steps per decoder layer
BATCH_WINDOWS = 4  # calibration windows per step
# Adam's step on the log of each block scale. Demo model after gptq-guided (held-out KL 0.0509): 1e-3 (at most
# about 20% in 200 steps, two E4M3 steps; 20-29% of the scales moved) 0.0547; 2e-4 (only scales near an E4M3
# boundary move, 0.3-1.7%) 0.0505, within noise
LR = 2e-4
CHECKS = 4  # how many times per run the kept-aside error is measured
REROUND = False  # re-round the codes to the nearest under the new scale instead of keeping GPTQ's
# "mse": the output's mean squared error; "normed": each token's error over its target's mean square, as the
# next RMSNorm (every branch input and the final norm) sees the residual stream
LOSS = "mse"


@dataclass
class ScaleSlot:
    """One dense weight of the layer ([N, K] linear or stacked experts [E, N, K]) with learnable block scales."""

    values: torch.Tensor  # the starting codes as E2M1 values
    codes: torch.Tensor  # the starting 4-bit codes
    scale: torch.Tensor  # the starting E4M3 block scales as fp32 [..., N, K/16]
    scale_2: torch.Tensor  # the tensor scale (0-d, or [E, 1, 1] for experts)
    members: list[Member]
    reround: bool = False
    log_gain: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.log_gain = torch.zeros_like(self.scale, requires_grad=True)

    def block_scales(self) -> torch.Tensor:
        """The block scales as stored (E4M3); gradients reach `log_gain` straight through the rounding."""
        soft = self.scale * torch.exp(self.log_gain)
        hard = soft.clamp(SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn).float()
        return hard + (soft - soft.detach())

    def _values(self, scales: torch.Tensor) -> torch.Tensor:
        if not self.reround:
            return self.values
        # the starting dequantized weight in units of the new scale, rounded to the nearest E2M1 value
        x = self.values * (self.scale / scales).repeat_interleave(BLOCK, dim=-1)
        nearest = e2m1_decode(e2m1_encode(x.detach()), x.dtype)
        return x + (nearest - x).detach()

    def weight(self) -> torch.Tensor:
        """The dequantized weight (NVFP4Tensor's order of products in the forward)."""
        scales = self.block_scales()
        return self._values(scales) * scales.repeat_interleave(BLOCK, dim=-1) * self.scale_2

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(4-bit codes, E4M3 block scales) as the checkpoint stores them."""
        scales = self.block_scales()
        if not self.reround:
            return self.codes, scales.to(torch.float8_e4m3fn)
        moved = (scales != self.scale).repeat_interleave(BLOCK, dim=-1)
        codes = torch.where(moved, e2m1_encode(self._values(scales)), self.codes)
        return codes, scales.to(torch.float8_e4m3fn)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The packed `.weight` and `.weight_scale` of every member, by checkpoint name."""
        codes, scales = self.final()
        out = {}
        for m in self.members:
            part, block = (codes[m.expert], scales[m.expert]) if m.expert is not None else (codes, scales)
            out[f"{prefix}{m.module}.weight"] = pack_nibbles(part[m.rows]).to(torch.uint8).cpu().contiguous()
            out[f"{prefix}{m.module}.weight_scale"] = block[m.rows].cpu().contiguous()
        return out


def scale_slots(rounding: dict[int, RoundingSlot], reround: bool | None = None) -> dict[int, ScaleSlot]:
    """Scale slots over the codes and scales of calib_round's slots (calib_round.layer_slots builds them
    from the refined checkpoint tensors, with learned rounding's codes when it ran first)."""
    reround = REROUND if reround is None else reround
    with torch.no_grad():
        return {
            key: ScaleSlot(s.values.clone(), s.final_codes(), s.scale, s.scale_2, s.members, reround)
            for key, s in rounding.items()
        }


@dataclass
class ScaleReport:
    loss_start: float  # kept-aside output MSE with the starting scales (all windows' when none are kept)
    loss_end: float  # with the scales written
    moved: int  # block scales that differ from the starting ones
    total: int


def learn_block_scales(
    layer: DecoderLayer,
    slots: dict[int, ScaleSlot],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    lengths: list[int],
    cfg: Gemma4TextConfig,
    *,
    per_layer_input: torch.Tensor | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    gradients: torch.Tensor | None = None,
    after: After | None = None,
) -> ScaleReport:
    """Tune the slots' block scales on `inputs` [T, H] (whole windows of `lengths`) towards `targets` [T, H];
    leaves each slot at the best checkpoint on the kept-aside windows. `gradients` [T, H]: the loss's
    gradients at the layer's output, which weight the error instead of LOSS (calib_fisher)."""
    steps = STEPS if steps is None else steps
    lr = LR if lr is None else lr
    device = inputs.device
    offsets, kept, train = window_split(lengths)
    saved = {m: m.backend for m in layer.modules() if hasattr(m, "backend")}
    backend = RoundingBackend(slots)  # type: ignore[arg-type]  # any slot with weight() will do
    for module in saved:
        module.backend = backend
    params = [s.log_gain for s in slots.values()]

    def loss_on(windows: list[int]) -> torch.Tensor:
        rows = torch.cat([torch.arange(offsets[w], offsets[w + 1], device=device) for w in windows])
        ctx = CalibrationContext(cfg, [lengths[w] for w in windows], chunk=0, kv_store={}, device=device)
        ple = per_layer_input[rows] if per_layer_input is not None else None
        out = layer(inputs[rows], ctx, ple)
        if after is not None:  # calib_window: judged after the next layer
            out = after(out, [lengths[w] for w in windows], rows)
        out, target = out.float(), targets[rows].float()
        if gradients is not None:
            return fisher_error(out, target, gradients[rows])
        if LOSS == "normed":
            return ((out - target).pow(2).mean(-1) / target.pow(2).mean(-1).clamp_min(1e-12)).mean()
        return F.mse_loss(out, target)

    judged = kept or train  # too few windows to keep some aside: the checkpoints are judged on all of them

    def kept_loss() -> float:
        with torch.no_grad():
            chunks = [judged[i : i + BATCH_WINDOWS] for i in range(0, len(judged), BATCH_WINDOWS)]
            return sum(float(loss_on(c)) * len(c) for c in chunks) / len(judged)

    try:
        start = best = kept_loss()
        best_params = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=lr)
        rng = random.Random(seed)
        check_every = max(1, steps // CHECKS)
        for step in range(steps):
            windows = rng.sample(train, min(BATCH_WINDOWS, len(train)))
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_on(windows).backward()
            optimizer.step()
            if (step + 1) % check_every == 0 or step + 1 == steps:
                now = kept_loss()
                if now < best:
                    best, best_params = now, [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, b in zip(params, best_params):
                p.copy_(b)
                p.grad = None
        moved = 0
        for s in slots.values():
            with torch.no_grad():
                moved += int((s.block_scales() != s.scale).sum())
        return ScaleReport(start, best, moved, sum(s.scale.numel() for s in slots.values()))
    finally:
        for module, old in saved.items():
            module.backend = old


def tune_layer_scales(
    layer: DecoderLayer,
    index: int,
    refined: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    per_layer_input: torch.Tensor | None,
    lengths: list[int],
    cfg: Gemma4TextConfig,
    *,
    prefix: str,
    gradients: torch.Tensor | None = None,
    after: After | None = None,
) -> tuple[dict[str, torch.Tensor], ScaleReport | None]:
    """The refine pass's step: block scales of every NVFP4 weight the layer's `refined` tensors hold, tuned
    against `targets` (the full-precision layer's outputs); returns the new codes and scales as checkpoint
    tensors and sets the layer's weights to them."""
    slots = scale_slots(layer_slots(layer, index, refined, originals, prefix))
    if not slots:
        return {}, None
    report = learn_block_scales(
        layer,
        slots,
        inputs,
        targets,
        lengths,
        cfg,
        per_layer_input=per_layer_input,
        gradients=gradients,
        after=after,
    )
    out: dict[str, torch.Tensor] = {}
    for slot in slots.values():
        out.update(slot.tensors(prefix))
    apply_rounding(layer, index, slots)  # type: ignore[arg-type]  # any slot with weight() will do
    return out, report
