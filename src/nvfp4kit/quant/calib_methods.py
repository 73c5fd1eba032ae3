"""The calibration methods `quantize` offers, by name: how each chooses an NVFP4 weight's scales and codes.

`max` is ModelOpt's own calibration (block scale amax/6, tensor scale amax/2688), what the streaming
quantizer writes in one pass. Every other method re-quantizes that export's weights layer by layer
(`calib_refine.refine_checkpoint`) through a group quantizer: a function from the weights of a fused group
(q/k/v, gate/up, an expert's gate/up, or one linear) and, for methods that use data, the input second-moment
matrix X^T X of their calibration activations, to one NVFP4 tensor per member sharing one tensor scale.
All of them write the same tensors with the same meaning; only the chosen values differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.quant.calib_gptq import gptq_quantize_group
from nvfp4kit.quant.calib_search import quantize_group_searched

GroupQuantizer = Callable[[list[torch.Tensor], "torch.Tensor | None"], list[NVFP4Tensor]]


@dataclass(frozen=True)
class CalibrationMethod:
    name: str
    help: str  # one line, shown by `nvfp4kit quantize --help`
    quantize_group: GroupQuantizer | None  # None: max calibration, no refine pass
    needs_data: bool  # whether the refine pass runs calibration tokens through the model
    asymmetric: bool = False  # fit each linear to the full-precision model's outputs (calib_asym)
    learned_rounding: bool = False  # then tune each layer's codes and norms against its outputs (calib_round)
    loss_weights: str | None = None  # weight tokens by the loss's gradients at each output (calib_guided)
    block_scales: bool = False  # last, tune each layer's block scales against its outputs (calib_block)
    layer_fisher: bool = (
        False  # those two weigh the layer's output error by the loss's gradients (calib_fisher)
    )

    @property
    def refines(self) -> bool:
        return self.quantize_group is not None


def _weight_mse(weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[NVFP4Tensor]:
    return quantize_group_searched(weights)


def _output_mse(weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[NVFP4Tensor]:
    if hessian is not None and weights[0].dim() == 2 and hessian.dim() == 3:  # per row group: their mean
        hessian = hessian.mean(0)
    return quantize_group_searched(weights, hessian=hessian)


def _gptq(weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[NVFP4Tensor]:
    if hessian is None:  # an expert no calibration token reached: search its scales on weight error
        return quantize_group_searched(weights)
    return gptq_quantize_group(weights, hessian)


CALIBRATION_METHODS: dict[str, CalibrationMethod] = {
    m.name: m
    for m in (
        CalibrationMethod(
            "max",
            "ModelOpt's: block scale amax/6, tensor scale amax/2688; one pass, bit-exact with ModelOpt",
            None,
            needs_data=False,
        ),
        CalibrationMethod(
            "mse",
            "search block and tensor scales for the least weight error (uses no calibration data)",
            _weight_mse,
            needs_data=False,
        ),
        CalibrationMethod(
            "mse-output",
            "search block and tensor scales for the least output error on the calibration activations",
            _output_mse,
            needs_data=True,
        ),
        CalibrationMethod(
            "gptq",
            "searched scales + GPTQ error-feedback rounding on the calibration activations (most accurate)",
            _gptq,
            needs_data=True,
            asymmetric=True,
        ),
        CalibrationMethod(
            "gptq-guided",
            "gptq with each token's statistics weighted by the model's KL sensitivity at the linear's outputs",
            _gptq,
            needs_data=True,
            asymmetric=True,
            loss_weights="sampled",
        ),
        CalibrationMethod(
            "gptq-round",
            "gptq, then each decoder layer's codes and norms tuned against the full-precision layer (slower)",
            _gptq,
            needs_data=True,
            asymmetric=True,
            learned_rounding=True,
        ),
    )
}


def calibration_method(name: str) -> CalibrationMethod:
    method = CALIBRATION_METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown calibration method {name!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    return method
