"""nvfp4kit: quantize, plan and run fully NVFP4 Gemma 4 models (W4A16 on SM80+ GPUs, or on a CPU)."""

from nvfp4kit.config import Gemma4TextConfig, load_config, load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.request import TokenEvent
from nvfp4kit.generate import LLM, RequestOutput
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "Engine",
    "EngineConfig",
    "Gemma4TextConfig",
    "RequestOutput",
    "SamplingParams",
    "TokenEvent",
    "load_config",
    "load_model",
    "load_preset",
]
