"""One plan for a model on a GPU: weights, KV per token, the seed stack's pools, ours, and the decode roofline.

`build_plan` returns plain JSON-able data; the CLI prints it as tables (`format_plan`) or as JSON, so both
views carry the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4kit.config import PRESET_DIR, Gemma4TextConfig, list_presets, load_config, load_preset
from nvfp4kit.plan.checkpoint import linear_copy_bytes_from_checkpoint, weights_from_checkpoint
from nvfp4kit.plan.gpus import DEFAULT_PRELOAD_USED, GpuSpec, find_gpu
from nvfp4kit.plan.kv import KV_DTYPE_BYTES, kv_bytes_per_token
from nvfp4kit.plan.pools import (
    DEFAULT_MAX_BATCH,
    PoolPlan,
    default_prefill_chunk,
    default_prefill_graphs,
    default_sliding_chunk,
    plan_pools,
)
from nvfp4kit.plan.roofline import decode_step
from nvfp4kit.plan.sglang import (
    SEED_MEM_FRACTION,
    SEED_SWA_RATIO,
    sglang_pools_for,
    tokens_per_fraction_step,
)
from nvfp4kit.plan.vision import DEFAULT_SOFT_TOKENS, VisionMemory, processor_soft_tokens, vision_memory
from nvfp4kit.plan.weights import (
    BF16_BYTES,
    TOWER_COMPONENTS,
    WeightBreakdown,
    linear_copies_auto,
    linear_copy_bytes,
    parameter_counts,
    weights_from_config,
)

DEFAULT_CONTEXT = 32_768
DEFAULT_GPU = "RTX 3090"  # the seed card's target


@dataclass(frozen=True)
class ModelSource:
    name: str
    kind: str  # "preset" or "checkpoint"
    cfg: Gemma4TextConfig
    tower_params: dict[str, int]  # vision / audio parameter counts, where known
    checkpoint: Path | None = None
    raw_config: dict[str, Any] | None = None  # config.json as written (a preset's "config")


def resolve_model(model: str) -> ModelSource:
    """A checkpoint folder (has config.json) or a preset name."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; pass a checkpoint folder or a preset name")
        raw = json.loads((path / "config.json").read_text())
        return ModelSource(path.name, "checkpoint", load_config(path), {}, path, raw)
    if model not in list_presets() and f"gemma-4-{model}" in list_presets():  # short names: e2b, 26b-a4b, ...
        model = f"gemma-4-{model}"
    if model in list_presets():
        raw = json.loads((PRESET_DIR / f"{model}.json").read_text())
        towers = {k: int(v) for k, v in raw.get("tower_parameters", {}).items() if k in TOWER_COMPONENTS}
        return ModelSource(model, "preset", load_preset(model), towers, None, raw.get("config"))
    raise ValueError(
        f"{model!r} is neither a checkpoint folder nor a preset; presets: {', '.join(list_presets())}"
    )


def _weights(source: ModelSource, recipe: str) -> tuple[WeightBreakdown, int]:
    """Weights as the engine loads them and the checkpoint's full size (towers included, as SGLang loads it)."""
    if source.checkpoint is not None:
        stored = weights_from_checkpoint(source.checkpoint)
        return stored, stored.total_bytes
    text = weights_from_config(source.cfg, recipe=recipe)
    towers = sum(source.tower_params.values()) * BF16_BYTES
    return text, text.text_bytes + towers


def plan_vision(source: ModelSource, weights: WeightBreakdown) -> VisionMemory | None:
    """The vision tower's memory when images are on: a checkpoint's vision tensors as stored (none: None),
    a preset's from its config in BF16; activations for one image at the processor's soft-token budget."""
    raw = source.raw_config or {}
    if source.checkpoint is not None:
        stored = weights.get("vision")
        if not stored:
            return None
        return vision_memory(raw, soft_tokens=processor_soft_tokens(source.checkpoint), weight_bytes=stored)
    return vision_memory(raw, soft_tokens=int(raw.get("vision_soft_tokens_per_image", DEFAULT_SOFT_TOKENS)))


def _gpu_dict(gpu: GpuSpec | None, memory: int, bandwidth: float | None, preload_used: int) -> dict[str, Any]:
    return {
        "name": gpu.name if gpu else "custom",
        "memory_bytes": memory,
        "bandwidth_bytes_per_s": bandwidth,
        "compute_capability": ".".join(map(str, gpu.compute_capability)) if gpu else None,
        "native_fp4": gpu.native_fp4 if gpu else None,
        "preload_used_bytes": preload_used,
        "free_bytes": memory - preload_used,
    }


def pool_summary(pool: PoolPlan) -> dict[str, Any]:
    """nvfp4kit's pools as JSON-able numbers: the plan's "nvfp4kit" section and the engine's start-up log."""
    return {
        "free_bytes": pool.free_bytes,
        "weights_bytes": pool.weights_bytes,
        "reserve": {
            "activations": pool.reserve.activations,
            "logits": pool.reserve.logits,
            "cuda_graphs": pool.reserve.cuda_graphs,
            "margin": pool.reserve.margin,
            "scratch": pool.reserve.scratch,
            "rotated_keys": pool.reserve.rotated_keys,
            "total": pool.reserve.total,
        },
        "kv_budget_bytes": pool.kv_budget_bytes,
        "k_eq_v_once": pool.kv.k_eq_v_once,
        "global_bytes_per_token": pool.kv.full,
        "sliding_bytes_per_token": pool.kv.sliding,
        "prefill_chunk": pool.prefill_chunk,
        "ring_tokens": pool.max_ring_tokens,
        "ring_bytes_per_request": pool.ring_bytes(pool.max_ring_tokens),
        "fits": pool.fits,
        "max_context": pool.max_context,
        "context": pool.context,
        "requests_at_context": pool.requests_at_context,
        "concurrency": pool.concurrency,
        "global_tokens": pool.global_tokens,
        "vision": pool.vision.summary() if pool.vision is not None else None,
    }


def build_plan(
    model: str,
    *,
    gpu: str | None = None,
    gpu_memory: int | None = None,
    bandwidth: float | None = None,
    kv_dtype: str = "fp8_e5m2",
    context: int | None = None,
    concurrency: int | None = None,
    recipe: str = "all-nvfp4",
    mem_fraction_static: float = SEED_MEM_FRACTION,
    swa_full_tokens_ratio: float = SEED_SWA_RATIO,
    prefill_chunk: int | None = None,
    preload_used: int = DEFAULT_PRELOAD_USED,
    sglang_weights: int | None = None,
    k_eq_v_once: bool = True,
    vision: bool = True,
    linear_copies: str = "auto",
) -> dict[str, Any]:
    """Everything `nvfp4kit plan` shows, as a JSON-able dict. `vision=False`: plan text-only serving (the
    vision tower neither loaded nor planned, as `--language-model-only`). `prefill_chunk`: default, the
    engine's tokens a step on a card of this memory (`default_prefill_chunk`). `linear_copies` ("auto", "on",
    "off"): the engine's BF16 copies of the non-expert linears (`engine.linear_copies`), held from the KV."""
    source = resolve_model(model)
    cfg = source.cfg
    spec = find_gpu(gpu) if gpu else (None if gpu_memory else find_gpu(DEFAULT_GPU))
    memory = gpu_memory if gpu_memory is not None else spec.memory_bytes
    bandwidth = bandwidth if bandwidth is not None else (spec.bandwidth_bytes_per_s if spec else None)
    free = memory - preload_used
    if free <= 0:
        raise ValueError(f"GPU memory {memory} B is not more than the {preload_used} B in use before loading")
    context = min(context or DEFAULT_CONTEXT, cfg.max_position_embeddings)
    prefill_chunk = prefill_chunk or default_prefill_chunk(memory)

    weights, checkpoint_bytes = _weights(source, recipe)
    if source.checkpoint is not None:
        copies = linear_copy_bytes_from_checkpoint(source.checkpoint)
    else:
        copies = linear_copy_bytes(cfg, recipe=recipe)
    if linear_copies not in ("auto", "on", "off"):
        raise ValueError(f"linear_copies must be auto, on or off, got {linear_copies!r}")
    if linear_copies == "off" or (linear_copies == "auto" and not linear_copies_auto(copies, memory)):
        copies = 0
    engine_weights = weights.text_bytes
    params = parameter_counts(cfg)
    towers = dict(source.tower_params)
    if source.checkpoint is not None:
        towers = {
            c: weights.params_by_component[c] for c in TOWER_COMPONENTS if c in weights.params_by_component
        }

    kv_table = {}
    for dtype in KV_DTYPE_BYTES:
        both = kv_bytes_per_token(cfg, kv_dtype=dtype)
        once = kv_bytes_per_token(cfg, kv_dtype=dtype, k_eq_v_once=True)
        kv_table[dtype] = {
            "sliding": both.sliding, "sliding_per_layer": both.sliding_per_layer,
            "full": both.full, "full_per_layer": both.full_per_layer, "full_k_eq_v_once": once.full,
            "sliding_layers": both.sliding_layers, "full_layers": both.full_layers,
        }  # fmt: skip

    sg_weights = sglang_weights if sglang_weights is not None else checkpoint_bytes
    sg = sglang_pools_for(
        cfg, weights_bytes=sg_weights, pre_load_free_bytes=free, kv_dtype=kv_dtype,
        mem_fraction_static=mem_fraction_static, swa_full_tokens_ratio=swa_full_tokens_ratio,
    )  # fmt: skip
    vision_plan = plan_vision(source, weights) if vision else None
    ours = plan_pools(
        cfg, free_bytes=free, weights_bytes=engine_weights + copies, kv_dtype=kv_dtype, k_eq_v_once=k_eq_v_once,
        prefill_chunk=prefill_chunk, context=context, concurrency=concurrency or 1,
        max_batch=max(DEFAULT_MAX_BATCH, concurrency or 1), vision=vision_plan,
        sliding_limit=default_sliding_chunk(memory),
        prefill_graph_tokens=max((t for t in default_prefill_graphs(memory) if t <= prefill_chunk), default=0),
    )  # fmt: skip

    plan: dict[str, Any] = {
        "model": {
            "name": source.name,
            "source": source.kind,
            "path": str(source.checkpoint) if source.checkpoint else None,
            "text_params": params.total,
            "active_params": params.active,
            "vision_params": towers.get("vision"),
            "audio_params": towers.get("audio"),
            "sliding_layers": cfg.num_sliding_layers,
            "full_layers": cfg.num_full_layers,
            "kv_shared_layers": cfg.num_kv_shared_layers,
            "sliding_window": cfg.sliding_window,
            "max_position_embeddings": cfg.max_position_embeddings,
            "experts": {"total": cfg.num_experts, "top_k": cfg.top_k_experts}
            if cfg.enable_moe_block
            else None,
        },  # fmt: skip
        "gpu": _gpu_dict(spec, memory, bandwidth, preload_used),
        "kv_dtype": kv_dtype,
        "weights": {
            "recipe": weights.recipe,
            "source": weights.source,
            "components": {
                c: {"bytes": b, "params": weights.params_by_component[c], "format": weights.formats[c]}
                for c, b in weights.bytes_by_component.items()
            },
            "engine_bytes": engine_weights,
            "linear_copies_bytes": copies,
            "vision_planned": vision_plan is not None,
            "checkpoint_bytes": checkpoint_bytes,
        },  # fmt: skip
        "kv_bytes_per_token": kv_table,
        "sglang": {
            "mem_fraction_static": mem_fraction_static,
            "swa_full_tokens_ratio": swa_full_tokens_ratio,
            "weights_bytes": sg_weights,
            "kv_bytes": sg.kv_bytes,
            "runtime_reserve_bytes": sg.runtime_reserve_bytes,
            "full_tokens": sg.full_tokens,
            "swa_tokens": sg.swa_tokens,
            "fits": sg.fits,
            "max_context": min(sg.full_tokens, cfg.max_position_embeddings) if sg.fits else 0,
            "requests_at_context": sg.requests_at(context),
            "full_tokens_per_0.01_fraction": tokens_per_fraction_step(sg),
        },  # fmt: skip
        "nvfp4kit": pool_summary(ours),
        "roofline": [],
    }
    if bandwidth:
        batch_n = concurrency or min(max(ours.requests_at_context, 1), DEFAULT_MAX_BATCH)
        for batch in sorted({1, batch_n}):
            step = decode_step(
                cfg, weights, ours.kv, batch=batch, context=context, bandwidth_bytes_per_s=bandwidth
            )
            plan["roofline"].append({
                "batch": batch, "context": context, "bytes_per_step": step.bytes_per_step,
                "bytes_by_part": step.bytes_by_part, "tokens_per_s": step.tokens_per_s,
                "tokens_per_s_per_request": step.tokens_per_s_per_request,
            })  # fmt: skip
    return plan
