"""Start-up memory plan of one rank: its shard's weights, its KV heads, the card it runs on.

Every rank holds about the same (the busiest rank is planned), so rank 0's plan sizes every rank's KV pools:
the workers copy rank 0's pool layout (`TensorParallelGroup.attach`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvfp4kit.config import load_config
from nvfp4kit.distributed.loading import is_quantized
from nvfp4kit.engine.engine import EngineConfig, resolve_kv_dtype
from nvfp4kit.engine.sizing import (
    FLOAT_DTYPES,
    MemoryOptions,
    StartupPlan,
    measure_device_memory,
    plan_engine_memory,
)
from nvfp4kit.formats.components import SCALE_SUFFIXES, TOWER_COMPONENTS, component_of
from nvfp4kit.formats.safetensors_io import DTYPE_BYTES, CheckpointReader
from nvfp4kit.model.loader import NON_TEXT_PREFIXES
from nvfp4kit.plan.parallel import ParallelLayout


def rank_weights_as_loaded(folder: str | Path, layout: ParallelLayout, rank: int, *, float_bytes: int) -> int:
    """Bytes of rank `rank`'s shard once loaded: float tensors at the load dtype, packed NVFP4 and scales as
    stored (the same rule as `engine.sizing.weights_as_loaded`, per shard)."""
    total = 0
    for info in CheckpointReader(folder).tensors.values():
        if info.name.startswith(NON_TEXT_PREFIXES) or component_of(info.name) in TOWER_COMPONENTS:
            continue
        stored = layout.rank_tensor_bytes(info, rank, prefix=layout.cfg.weight_prefix)
        is_scale = info.name.rsplit(".", 1)[-1] in SCALE_SUFFIXES
        if info.dtype in FLOAT_DTYPES and not is_scale:
            stored = stored // DTYPE_BYTES[info.dtype] * float_bytes
        total += stored
    return total


def plan_parallel_memory(
    folder: str | Path,
    tensor_parallel_size: int,
    *,
    device: torch.device,
    model_dtype: torch.dtype,
    config: EngineConfig,
    options: MemoryOptions,
    fp8_lm_head: bool = False,
) -> StartupPlan | None:
    """`plan_checkpoint_memory` for the busiest rank of `tensor_parallel_size` (None on the CPU); images are
    off under TP. Raises `ShardingError` when the model does not split that way."""
    layout = ParallelLayout(load_config(folder), tensor_parallel_size).check(nvfp4=is_quantized(folder))
    float_bytes = torch.empty((), dtype=model_dtype).element_size()
    weights = max(
        rank_weights_as_loaded(folder, layout, r, float_bytes=float_bytes) for r in range(layout.world)
    )
    cfg = layout.cfg
    if fp8_lm_head:
        weights += len(layout.vocab_range(0)) * (cfg.hidden_size + 4)
    return plan_engine_memory(
        layout.local_config(),
        weights_bytes=weights,
        memory=measure_device_memory(device),
        options=options,
        config=config,
        kv_dtype=resolve_kv_dtype(config.kv_dtype, model_dtype=model_dtype),
        vision=None,
    )
