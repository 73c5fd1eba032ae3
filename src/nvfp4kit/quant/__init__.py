"""Layer-wise calibration and streaming NVFP4 quantization of Gemma 4 checkpoints (`nvfp4kit quantize`)."""

from nvfp4kit.quant.calib_methods import CALIBRATION_METHODS, CalibrationMethod
from nvfp4kit.quant.pipeline import QuantizeReport, quantize
from nvfp4kit.quant.recipe import CALIBRATIONS, RECIPES, QuantRecipe

__all__ = [
    "CALIBRATIONS",
    "CALIBRATION_METHODS",
    "RECIPES",
    "CalibrationMethod",
    "QuantRecipe",
    "QuantizeReport",
    "quantize",
]
