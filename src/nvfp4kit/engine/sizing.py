"""How much memory the engine gives its KV cache, planned at start-up before any weight is loaded.

The engine asks the planner (`nvfp4kit.plan`) what `nvfp4kit plan` shows: the weights (from the checkpoint's
headers, at the dtype they load in), the runtime reserve (prefill activations, logits, CUDA graphs, weight-expansion scratch, a margin)
and the KV pools (a sliding ring per sequence, the rest global-layer tokens). What the engine may use comes
from the card (total and free memory, measured at start) and three options, named as in vLLM:

- `gpu_memory_utilization` F: the engine may use F x the card's total memory, everything included;
- `gpu_memory_budget` SIZE: the engine behaves as if the card had SIZE bytes (a shared card, or a 24 GB card
  emulated on a larger one); it replaces the utilization;
- `kv_cache_memory` SIZE: the KV bytes themselves; the other two no longer size anything, and the check is
  that weights + reserve + KV fit the free memory (or the budget, when one is given).

Memory in use at start (total - free) up to `CONTEXT_ALLOWANCE` is counted as this process's CUDA context,
inside the limit; anything beyond belongs to other processes and only lowers what is free, so the plan never
exceeds the free memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4kit.config import Gemma4TextConfig, load_config
from nvfp4kit.engine.engine_config import EngineConfig, resolve_kv_dtype
from nvfp4kit.formats.components import SCALE_SUFFIXES, TOWER_COMPONENTS, component_of
from nvfp4kit.formats.safetensors_io import DTYPE_BYTES, CheckpointReader
from nvfp4kit.model.loader import NON_TEXT_PREFIXES
from nvfp4kit.plan.gpus import DEFAULT_PRELOAD_USED
from nvfp4kit.plan.pools import DEFAULT_GPU_MEMORY_UTILIZATION, PoolPlan, plan_pools, runtime_reserve
from nvfp4kit.plan.report import pool_summary
from nvfp4kit.plan.text import format_pool_rows
from nvfp4kit.plan.units import GiB, MiB, parse_size
from nvfp4kit.plan.vision import VisionMemory, processor_soft_tokens, vision_memory

# What a 24 GB card has in use before loading (the seed card's numbers); our own CUDA context stays below it.
CONTEXT_ALLOWANCE = DEFAULT_PRELOAD_USED
FLOAT_DTYPES = ("BF16", "F16", "F32")


def format_size(n_bytes: float) -> str:
    """'14.22 GiB', or '60.2 MiB' below a GiB (tiny models and CPU runs)."""
    return f"{n_bytes / GiB:.2f} GiB" if abs(n_bytes) >= GiB else f"{n_bytes / MiB:.1f} MiB"


class InsufficientMemoryError(ValueError):
    """The model, its runtime reserve and the smallest useful KV cache do not fit the memory it may use."""


@dataclass(frozen=True)
class MemoryOptions:
    """The user's say on memory; None means unset (the utilization then defaults to 0.90)."""

    gpu_memory_utilization: float | None = None
    gpu_memory_budget: int | None = None  # bytes
    kv_cache_memory: int | None = None  # bytes

    def __post_init__(self) -> None:
        util = self.gpu_memory_utilization
        if util is not None and not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        if util is not None and self.gpu_memory_budget is not None:
            raise ValueError(
                "give gpu_memory_utilization (a fraction of the card) or gpu_memory_budget (bytes), not both"
            )
        for name in ("gpu_memory_budget", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")

    @classmethod
    def parse(
        cls,
        *,
        gpu_memory_utilization: float | None = None,
        gpu_memory_budget: int | str | None = None,
        kv_cache_memory: int | str | None = None,
    ) -> MemoryOptions:
        """Options with sizes given as bytes or strings ('24GiB')."""
        budget = (
            None if gpu_memory_budget is None else parse_size(gpu_memory_budget, option="gpu_memory_budget")
        )
        kv = None if kv_cache_memory is None else parse_size(kv_cache_memory, option="kv_cache_memory")
        return cls(gpu_memory_utilization, budget, kv)


@dataclass(frozen=True)
class DeviceMemory:
    """What the card reports at start-up, before any weight is loaded (our CUDA context already exists)."""

    total_bytes: int
    free_bytes: int
    name: str = "GPU"

    @property
    def in_use_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


def measure_device_memory(device: torch.device | str) -> DeviceMemory | None:
    """Total and free memory of a CUDA device; None on the CPU (nothing to measure)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total, free, torch.cuda.get_device_name(device))


def weights_as_loaded(folder: str | Path, *, float_bytes: int) -> int:
    """Bytes of the text tower once loaded, from the safetensors headers: float tensors at the load dtype
    (`float_bytes` per element), packed NVFP4 weights and quantization scales as stored."""
    total = 0
    for info in CheckpointReader(folder).tensors.values():
        if info.name.startswith(NON_TEXT_PREFIXES) or component_of(info.name) in TOWER_COMPONENTS:
            continue
        is_scale = info.name.rsplit(".", 1)[-1] in SCALE_SUFFIXES
        if info.dtype in FLOAT_DTYPES and not is_scale:
            total += info.nbytes // DTYPE_BYTES[info.dtype] * float_bytes
        else:
            total += info.nbytes
    return total


def vision_as_loaded(folder: str | Path, *, float_bytes: int) -> VisionMemory | None:
    """The vision tower's memory once images are used: its tensors at the load dtype (clip bounds stay fp32,
    as `vision.loader` keeps them) and one image's encoder peak; None without vision tensors."""
    weight_bytes = 0
    for info in CheckpointReader(folder).tensors.values():
        if component_of(info.name) != "vision":
            continue
        numel = info.nbytes // DTYPE_BYTES[info.dtype]
        weight_bytes += numel * (4 if info.name.endswith(("_min", "_max")) else float_bytes)
    if not weight_bytes:
        return None
    raw = json.loads((Path(folder) / "config.json").read_text())
    return vision_memory(
        raw, soft_tokens=processor_soft_tokens(folder), float_bytes=float_bytes, weight_bytes=weight_bytes
    )


@dataclass(frozen=True)
class StartupPlan:
    """The engine's memory at start-up: the planner's pools plus where the limit came from."""

    pool: PoolPlan
    kv_dtype: str
    max_model_len: int
    model_max_position: int
    cuda_graphs: bool
    memory: DeviceMemory | None
    limit_bytes: int | None  # all the engine may use (CUDA context included); None: no limit applies
    limit_source: str | None  # the option that set the limit
    usable_bytes: int | None  # for weights + reserve + KV (limit - our context, at most the free memory)
    kv_source: str  # "planned", or the option that fixed the KV size
    block_size: int  # global-pool block, in tokens

    @property
    def kv_cache_memory(self) -> int:
        """Bytes for both KV pools: `EngineConfig.kv_cache_memory`."""
        return self.pool.kv_budget_bytes

    @property
    def ring_bytes(self) -> int:
        """All sliding rings: the engine allocates one per sequence it may run."""
        return self.pool.concurrency * self.pool.ring_bytes(self.pool.max_ring_tokens)

    @property
    def min_kv_bytes(self) -> int:
        """The smallest cache a planned engine accepts: every sliding ring plus one request at max_model_len."""
        return self.ring_bytes + self.max_model_len * self.pool.kv.full

    def format(self) -> str:
        """The start-up log block: memory facts, then the pools as `nvfp4kit plan` prints them."""
        p = self.pool
        kv_note = "K=V once" if p.kv.k_eq_v_once else "K and V separate"
        graphs = "CUDA graphs on" if self.cuda_graphs else "eager"
        lines = [
            f"Engine memory plan, KV {self.kv_dtype} ({kv_note}, prefill chunk {p.prefill_chunk:,}, "
            f"{p.concurrency} sequence{'s' if p.concurrency != 1 else ''}, {graphs})"
        ]
        lines += ["  " + line for line in self._limit_lines()]
        limit_note = "model limit" if self.max_model_len == self.model_max_position else "--max-model-len"
        lines += format_pool_rows(pool_summary(p), limit=self.max_model_len, limit_note=limit_note)
        return "\n".join(lines)

    def _limit_lines(self) -> list[str]:
        m = self.memory
        if m is None:
            return [f"CPU: no device memory to measure; KV set by {self.kv_source}"]
        lines = [
            f"{m.name}: {format_size(m.total_bytes)} total, {format_size(m.in_use_bytes)} in use at start, "
            f"{format_size(m.free_bytes)} free"
        ]
        if self.limit_bytes is None:
            return [*lines, f"KV set by {self.kv_source}; weights + reserve + KV must fit the free memory"]
        own = min(m.in_use_bytes, CONTEXT_ALLOWANCE)
        lines.append(
            f"limit {format_size(self.limit_bytes)} ({self.limit_source}) - {format_size(own)} CUDA context "
            f"-> {format_size(self.usable_bytes)} for weights, reserve and KV"
            + ("" if self.kv_source == "planned" else f"; KV fixed by {self.kv_source}")
        )
        if self.limit_bytes - own > m.free_bytes:
            lines.append("  (capped at the free memory: other processes hold the rest)")
        return lines


def _limit(memory: DeviceMemory, options: MemoryOptions) -> tuple[int, str]:
    if options.gpu_memory_budget is not None:
        return options.gpu_memory_budget, f"--gpu-memory-budget {format_size(options.gpu_memory_budget)}"
    util = options.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    return int(util * memory.total_bytes), f"--gpu-memory-utilization {util:.2f}"


def plan_engine_memory(
    cfg: Gemma4TextConfig,
    *,
    weights_bytes: int,
    memory: DeviceMemory | None,
    options: MemoryOptions,
    config: EngineConfig,
    kv_dtype: str,
    vision: VisionMemory | None = None,
) -> StartupPlan | None:
    """The engine's KV budget from the model, its weight bytes, the card and the options; `vision`: the
    vision tower's weights and encoder peak, held back from the KV cache when images are on.

    `kv_dtype` is the engine's resolved cache dtype (see `engine.resolve_kv_dtype`). Returns None when there is
    nothing to plan: on the CPU without an explicit KV size (`kv_cache_memory` or `config.num_kv_tokens`),
    the engine keeps its own default. Raises `InsufficientMemoryError`, with the numbers, when weights +
    reserve + the smallest useful KV (every sliding ring and one max_model_len request) do not fit.
    """
    seqs, chunk = config.max_num_seqs, config.max_num_batched_tokens
    if chunk is None:
        raise ValueError(
            "plan_engine_memory needs max_num_batched_tokens: apply engine.with_device_defaults first"
        )
    max_model_len = config.max_model_len or cfg.max_position_embeddings
    shape = plan_pools(cfg, free_bytes=0, weights_bytes=0, kv_dtype=kv_dtype, k_eq_v_once=config.k_eq_v_once,
                       prefill_chunk=chunk, concurrency=seqs, max_batch=seqs,
                       sliding_limit=config.sliding_chunk)  # fmt: skip
    explicit_kv, kv_source = options.kv_cache_memory, "planned"
    if explicit_kv is not None:
        kv_source = f"--kv-cache-memory {format_size(explicit_kv)}"
    elif config.num_kv_tokens is not None:
        explicit_kv = seqs * shape.ring_bytes(shape.max_ring_tokens) + config.num_kv_tokens * shape.kv.full
        kv_source = f"num_kv_tokens={config.num_kv_tokens:,}"
    if memory is None and explicit_kv is None:
        return None

    limit = limit_source = usable = None
    if memory is not None:
        limit, limit_source = _limit(memory, options)
        usable = min(limit - min(memory.in_use_bytes, CONTEXT_ALLOWANCE), memory.free_bytes)
        if explicit_kv is not None and options.gpu_memory_budget is None:
            limit = limit_source = None  # the KV size is given: only the free memory bounds it
            usable = memory.free_bytes
    graphs = config.cuda_graphs and memory is not None  # graphs are captured on CUDA only
    reserve = runtime_reserve(
        cfg, free_bytes=usable if usable is not None else weights_bytes + explicit_kv, prefill_chunk=chunk,
        max_batch=seqs, prefill_graph_tokens=max((t for t in config.prefill_graphs or () if t <= chunk), default=0),
        context=max_model_len,
    )  # fmt: skip
    if not graphs:
        reserve = dataclasses.replace(reserve, cuda_graphs=0)
    vision_bytes = vision.total if vision is not None else 0
    pools_free = usable if explicit_kv is None else weights_bytes + reserve.total + vision_bytes + explicit_kv
    pool = plan_pools(
        cfg, free_bytes=pools_free, weights_bytes=weights_bytes, kv_dtype=kv_dtype,
        k_eq_v_once=config.k_eq_v_once, prefill_chunk=chunk, sliding_limit=config.sliding_chunk,
        context=max_model_len, concurrency=seqs,
        max_batch=seqs, reserve=reserve, vision=vision,
    )  # fmt: skip
    plan = StartupPlan(
        pool=dataclasses.replace(pool, max_position=max_model_len),  # the engine serves up to max_model_len
        kv_dtype=kv_dtype, max_model_len=max_model_len, model_max_position=cfg.max_position_embeddings,
        cuda_graphs=graphs, memory=memory, limit_bytes=limit, limit_source=limit_source, usable_bytes=usable,
        kv_source=kv_source, block_size=config.block_size,
    )  # fmt: skip
    _check_fits(plan, explicit_kv=explicit_kv)
    return plan


def _check_fits(plan: StartupPlan, *, explicit_kv: int | None) -> None:
    p = plan.pool
    minimum = (
        f"minimum KV {format_size(plan.min_kv_bytes)} ({p.concurrency} sliding rings of {p.max_ring_tokens:,} "
        f"tokens and one {plan.max_model_len:,}-token request, {plan.kv_dtype})"
    )
    smallest = plan.ring_bytes + plan.block_size * p.kv.full  # what the engine itself needs
    if explicit_kv is not None and explicit_kv < smallest:
        raise InsufficientMemoryError(
            f"the KV cache ({plan.kv_source}) is smaller than {p.concurrency} sliding rings of "
            f"{p.max_ring_tokens:,} tokens and one global block ({format_size(smallest)}, {plan.kv_dtype}). "
            "Try a larger --kv-cache-memory or a smaller --max-num-seqs"
        )
    if plan.usable_bytes is None:
        return
    kv = plan.min_kv_bytes if explicit_kv is None else explicit_kv
    needed = p.weights_bytes + p.reserve.total + p.vision_bytes + kv
    if needed <= plan.usable_bytes:
        return
    m = plan.memory
    card = (
        f"{format_size(m.in_use_bytes)} in use at start, {format_size(m.free_bytes)} free of "
        f"{format_size(m.total_bytes)} on {m.name}"
    )
    where = f"the limit leaves {format_size(plan.usable_bytes)} ({plan.limit_source}; {card})"
    kv_text = minimum if explicit_kv is None else f"KV {format_size(explicit_kv)} ({plan.kv_source})"
    if explicit_kv is None:
        advice = (
            "Try a smaller --max-model-len, a smaller --max-num-seqs, an FP8 --kv-cache-dtype, or more memory "
            "(--gpu-memory-budget / --gpu-memory-utilization)"
        )
    elif plan.limit_source is not None:
        advice = "Try a smaller --kv-cache-memory or a larger --gpu-memory-budget"
    else:
        where, advice = f"only {card}", "Try a smaller --kv-cache-memory"
    vision = f"vision tower {format_size(p.vision_bytes)} + " if p.vision_bytes else ""
    if p.vision_bytes:
        advice += "; --language-model-only leaves the vision tower out (text only)"
    raise InsufficientMemoryError(
        f"the model does not fit: weights {format_size(p.weights_bytes)} + runtime reserve "
        f"{format_size(p.reserve.total)} (CUDA graphs {format_size(p.reserve.cuda_graphs)}) + {vision}{kv_text} = "
        f"{format_size(needed)}, but {where}. {advice}"
    )


def plan_checkpoint_memory(
    folder: str | Path,
    *,
    device: torch.device | str,
    model_dtype: torch.dtype,
    config: EngineConfig,
    options: MemoryOptions,
    fp8_lm_head: bool = False,
    vision: bool = True,
    copies_bytes: int = 0,
) -> StartupPlan | None:
    """`plan_engine_memory` for a checkpoint folder on a device: headers and memory read, nothing loaded.
    `fp8_lm_head`: count the FP8 copy of the output projection (see `Gemma4Model.use_fp8_lm_head`);
    `vision`: images on (the checkpoint's vision tower, if it has one, is planned); `copies_bytes`: weight
    copies kept beside the checkpoint's (`engine.linear_copies`)."""
    cfg = load_config(folder)
    float_bytes = torch.empty((), dtype=model_dtype).element_size()
    extra = copies_bytes + (cfg.vocab_size * (cfg.hidden_size + 4) if fp8_lm_head else 0)
    return plan_engine_memory(
        cfg,
        weights_bytes=weights_as_loaded(folder, float_bytes=float_bytes) + extra,
        memory=measure_device_memory(device),
        options=options,
        config=config,
        kv_dtype=resolve_kv_dtype(config.kv_dtype, model_dtype=model_dtype),
        vision=vision_as_loaded(folder, float_bytes=float_bytes) if vision else None,
    )
