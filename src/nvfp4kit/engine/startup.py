"""What `LLM` and `RandomLLM` do before any weight loads: the device check, the memory flags, the kernels'
tuning tables."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nvfp4kit.engine.engine import EngineConfig, with_device_defaults
from nvfp4kit.engine.sizing import MemoryOptions

log = logging.getLogger(__name__)


def check_device(device: torch.device) -> None:
    """One clear line instead of torch's assertion when CUDA is asked for on a machine without it."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device} asked for, but this torch ({torch.__version__}) sees no CUDA GPU: install "
            "the CUDA build of torch on a GPU machine, or use --device cpu"
        )


def memory_options(
    engine_config: EngineConfig,
    *,
    device: torch.device,
    gpu_memory_utilization: float | None,
    gpu_memory_budget: int | str | None,
    kv_cache_memory: int | str | None,
) -> tuple[EngineConfig, MemoryOptions]:
    """The memory flags parsed; a KV size given here wins over a token count in `engine_config`. What the config
    leaves to the device is filled in for it (or for the budget's card size): the plan sizes for those values."""
    if kv_cache_memory is not None:
        engine_config = replace(engine_config, num_kv_tokens=None)
    options = MemoryOptions.parse(
        gpu_memory_utilization=gpu_memory_utilization,
        gpu_memory_budget=gpu_memory_budget,
        kv_cache_memory=kv_cache_memory if kv_cache_memory is not None else engine_config.kv_cache_memory,
    )
    engine_config = with_device_defaults(engine_config, device, gpu_memory_budget=options.gpu_memory_budget)
    return engine_config, options


def prepare_kernel_tables(
    config: Callable[[], Any], *, kernel_cache_dir: str | Path | None, tune: bool, device: torch.device
) -> None:
    """Read the kernels' tuning tables from `kernel_cache_dir` (for the whole process, as $NVFP4KIT_CACHE_DIR;
    tensor-parallel ranks read the same folder) and, with `tune` on a GPU, time the entries missing for the
    model's shapes (`config()`: its Gemma4TextConfig) before the weights load: the tuner needs the room."""
    if kernel_cache_dir is not None:
        from nvfp4kit.kernels.configs import set_cache_dir

        set_cache_dir(kernel_cache_dir)
    if tune and device.type == "cuda":
        from nvfp4kit.tuning.autotune import tune_model

        _, cache = tune_model(config(), missing_only=True, log=log.debug)
        log.info("kernel tuning cache: %s", cache)
