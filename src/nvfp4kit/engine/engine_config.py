"""`EngineConfig`: what an engine is built with, and the defaults it leaves to the device and the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nvfp4kit.plan.pools import default_prefill_chunk, default_prefill_graphs, default_sliding_chunk

# CUDA: at most ~0.7 s at 100 running (14 ms decode steps on an H100), less where a whole step's tokens wait
# (admission_tokens admits them at once). H100, 26B-A4B, 1,000 prompts at concurrency 100 (session 33): 16 -> 48
# steps took the steps that prefill from ~3.3K to ~4.8K tokens, 31.5K -> 37.0K prompt tokens a second, output
# 4,957 -> 5,131 tok/s, TTFT mean 382 -> 412 ms (p99 1,458 -> 1,418 ms). 96 steps: +0.5% (session 34, noise)
DEFAULT_ADMISSION_DELAY = 48


@dataclass(frozen=True)
class EngineConfig:
    kv_dtype: str = "auto"  # bf16, fp8_e4m3, fp8_e5m2, float32; auto = the model's compute dtype
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None  # tokens a step, prefill chunks included; None: by device
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    num_kv_tokens: int | None = None  # global-pool capacity in tokens; default: from kv_cache_memory
    kv_cache_memory: int | None = (
        None  # bytes for both pools; default: enough for max_num_seqs * 4K tokens on CPU
    )
    k_eq_v_once: bool = True  # store the shared K=V tensor of k_eq_v layers once
    attention_backend: str | None = None  # "triton" or "torch"; default: triton on CUDA, torch on CPU
    cuda_graphs: bool = True  # replay captured decode steps on CUDA (False: eager, as --enforce-eager)
    graph_batch_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; default 1,2,4,8,16,...
    prefix_caching: bool = True  # reuse the KV of prompt beginnings computed before (engine/prefix_cache.py)
    # launch decode step N+1 from step N's tokens on the device before the host reads them; None: on CUDA only
    overlap_schedule: bool | None = None
    # before serving, run every kernel variant a step can reach (engine/warmup.py); None: on CUDA only
    warmup: bool | None = None
    # most tokens of a sequence one sliding-layer attention pass takes (rings hold window + this); longer prefill
    # chunks attend sliding layers in several passes. None: by device, 2048 on 70+ GiB GPUs, else 512 (each capped
    # at max_num_batched_tokens)
    sliding_chunk: int | None = None
    # steps a prompt arriving while 32+ requests run may wait for others to share its prefill step (an eager step
    # costs about the same for one prompt or four); None: by device, DEFAULT_ADMISSION_DELAY on CUDA, 0 (admit at
    # once) elsewhere
    admission_delay: int | None = None
    # prompt tokens waiting that end that wait at once; None: max_num_batched_tokens (a full prefill step). H100,
    # 26B-A4B, 1,000 prompts at concurrency 100 (session 34): half a step (the old default) 5,147 output tok/s
    # (TTFT mean 487 ms), a whole step 5,265 / 5,288 (567-598 ms): prefill steps at 39.7K prompt tokens a second
    admission_tokens: int | None = None
    # token counts of the steps that prefill to capture in CUDA graphs (engine/prefill_graphs.py); () = eager.
    # None: by device, 256, 512, ..., 2048 on 70+ GiB GPUs, none elsewhere (`plan.pools.default_prefill_graphs`)
    prefill_graphs: tuple[int, ...] | None = None


def with_device_defaults(
    config: EngineConfig, device: torch.device | str, *, gpu_memory_budget: int | None = None
) -> EngineConfig:
    """`config` with what it leaves to the device filled in, by the GPU's memory, or by `gpu_memory_budget` when
    the engine acts as if the card had that much: `max_num_batched_tokens` (`plan.pools.default_prefill_chunk`), the
    cap on a sliding-layer pass (`plan.pools.default_sliding_chunk`), the prefill CUDA graphs
    (`plan.pools.default_prefill_graphs`) and the admission delay."""
    device = torch.device(device)
    if config.admission_delay is None:
        config = replace(config, admission_delay=DEFAULT_ADMISSION_DELAY if device.type == "cuda" else 0)
    if None not in (config.max_num_batched_tokens, config.sliding_chunk, config.prefill_graphs):
        return config
    memory = None
    if device.type == "cuda":
        memory = gpu_memory_budget or torch.cuda.get_device_properties(device).total_memory
    return replace(
        config,
        max_num_batched_tokens=config.max_num_batched_tokens or default_prefill_chunk(memory),
        sliding_chunk=config.sliding_chunk or default_sliding_chunk(memory),
        prefill_graphs=default_prefill_graphs(memory)
        if config.prefill_graphs is None
        else config.prefill_graphs,
    )


def resolve_kv_dtype(kv_dtype: str, *, model_dtype: torch.dtype) -> str:
    """The cache dtype for `EngineConfig.kv_dtype` ("auto": float32 for float32 models, else bf16)."""
    if kv_dtype != "auto":
        return kv_dtype
    return "float32" if model_dtype == torch.float32 else "bf16"
