"""nvfp4kit: quantize, plan and run fully NVFP4 Gemma 4 models (W4A16 on SM80+ GPUs, or on a CPU).

Names are imported lazily, so `import nvfp4kit` (and commands such as `nvfp4kit plan`) do not pay for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "nvfp4kit.llm",
    "RequestOutput": "nvfp4kit.engine.outputs",
    "CompletionOutput": "nvfp4kit.engine.outputs",
    "Engine": "nvfp4kit.engine.engine",
    "EngineConfig": "nvfp4kit.engine.engine",
    "TokenEvent": "nvfp4kit.engine.request",
    "SamplingParams": "nvfp4kit.sampling",
    "Gemma4TextConfig": "nvfp4kit.config",
    "load_config": "nvfp4kit.config",
    "load_preset": "nvfp4kit.config",
    "load_model": "nvfp4kit.model.loader",
    "quantize": "nvfp4kit.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nvfp4kit' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
