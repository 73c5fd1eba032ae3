"""Start-up warm-up: the Triton kernel variants a serving step can reach, compiled before the first request.

Triton compiles a kernel lazily, once per combination of its constexpr arguments and of the specialisation of
its other arguments: an integer equal to 1 or divisible by 16, and a pointer aligned to 16 bytes, each get a
variant of their own. A step that meets a combination no step before it had waits for a compile (0.3-2 s on an
H200), and every stream of the batch sees that gap. The kernels a step launches take what changes with every
step (token, row, sequence and tile counts, block-table widths, split counts, metadata rows) unspecialised, so
what is left to vary is few: CUDA-graph capture covers the decode-only batches; `warm_up` covers the rest.

The plan (`engine/warmup_plan.py`) comes from the engine's limits and this model, card and attention backend:
one token count per launch-configuration bucket (`select_linear_config` / `select_moe_config` of the model's
NVFP4 shapes, the dequantize-then-cuBLAS and grouped-MoE thresholds, the tiles wrappers size by a count), every
sampled-row class, and every
split variant of the decode attention (no split, or the merge kernel's chunk of 2, 4 or 8 splits) per layer
kind. `warm_up` runs its steps through the engine's real forward
(`BatchContext`, `hidden_states`, `logits`) on dummy tokens, so a kernel the plan does not name is still met.
All sequences write into one scratch global block (every block-table entry names it) and one scratch sliding
ring; their rows are saved first and written back after, and nothing goes through the scheduler or the prefix
cache, so the pools, free lists and cache end as they started.

Compilations after it are counted and logged by `engine/kernel_compiles.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nvfp4kit.engine import batch_sampler
from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.kernel_compiles import COMPILES
from nvfp4kit.engine.warmup_plan import StepLimits, WarmupStep, plan_steps
from nvfp4kit.kernels.thresholds import DEQUANT_MIN_M, MOE_PREFILL_MIN_TOKENS

if TYPE_CHECKING:
    from nvfp4kit.config import Gemma4TextConfig
    from nvfp4kit.engine.engine import Engine

log = logging.getLogger(__name__)


# ---- the plan for one engine ----------------------------------------------------------------------------
def engine_plan(engine: Engine) -> list[WarmupStep]:
    """`plan_steps` for this engine's model, limits, card and attention backend."""
    sched = engine.scheduler.config
    limits = StepLimits(
        max_tokens=sched.max_num_batched_tokens, max_chunk=sched.max_prefill_chunk,
        max_seqs=engine.config.max_num_seqs, max_len=min(engine.max_model_len, engine.pool_tokens),
        block_size=engine.layout.block_size, eager_decode=engine.graphs is None,
    )  # fmt: skip
    backend = select_attention_backend(engine.device, engine.config.attention_backend)
    linears, experts = _quantized_shapes(engine.model)
    return model_plan(
        engine.model.config, limits, linears=linears, experts=experts, device=engine.device,
        triton_attention=backend.name == "triton", kv_fp8=engine.cache.kv_dtype.itemsize == 1,
    )  # fmt: skip


def model_plan(
    cfg: Gemma4TextConfig,
    limits: StepLimits,
    *,
    linears: list[tuple[int, int]],
    experts: list[tuple[int, int, int]],
    device: torch.device,
    triton_attention: bool,
    kv_fp8: bool,
) -> list[WarmupStep]:
    """`plan_steps` for a model of this config with these NVFP4 shapes ((N, K) of the linears, (experts,
    hidden, intermediate) of the expert stacks) on `device`: no weights needed, so a plan can be sized anywhere.
    `kv_fp8`: FP8 KV pools, whose decode attention tiles (and so key split counts) differ from BF16 ones."""
    from nvfp4kit.kernels import configs

    thresholds = _path_thresholds()

    def bucket_of(t: int) -> Hashable:
        lin = tuple(configs.select_linear_config(t, n, k, device=device) for n, k in linears)
        moe = tuple(
            configs.select_moe_config(t, e, cfg.top_k_experts, h, i, device=device) for e, h, i in experts
        )
        # tiles some wrappers size by a count: w8a16's BM and the fused router's BLOCK_T (tokens, up to 64),
        # moe_align's CHUNK (token-expert pairs, 64 to 1024)
        tiles = (min(_pow2(t), 64), min(max(_pow2(t * cfg.top_k_experts), 64), 1024) if experts else 0)
        paths = tuple(t >= m for m in thresholds)
        return lin, moe, tiles, paths  # the token count itself reaches every kernel unspecialised

    if not triton_attention:  # the torch attention compiles nothing
        return plan_steps(limits, bucket_of=bucket_of)
    from nvfp4kit.kernels.attention_launch import choose_num_splits, split_variant
    from nvfp4kit.kernels.rotated_keys import PREROTATE_MIN_KEYS

    if cfg.attention_k_eq_v:  # global layers derive K from V: long prefills take pre-rotated keys
        limits = dataclasses.replace(limits, prerotate_keys=PREROTATE_MIN_KEYS)

    kinds = sorted({
        (cfg.sliding_window if cfg.is_sliding(layer) else None, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer))
        for layer in range(cfg.num_hidden_layers)
    }, key=str)  # fmt: skip

    def splits_of(d: int, keys: int) -> Hashable:
        return tuple(
            split_variant(choose_num_splits(
                d, kvh, min(keys, w or keys), device=device, head_dim=hd, group=cfg.num_attention_heads // kvh,
                fp8=kv_fp8,
            ))
            for w, kvh, hd in kinds
        )  # fmt: skip

    return plan_steps(limits, bucket_of=bucket_of, splits_of=splits_of)


def _quantized_shapes(model: torch.nn.Module) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(N, K) of the NVFP4 linears and (experts, hidden, intermediate) of the NVFP4 expert stacks."""
    linears, experts = set(), set()
    for module in model.modules():
        packed = getattr(module, "weight_packed", None)
        if isinstance(packed, torch.Tensor) and packed.dim() == 2:
            linears.add((packed.shape[0], packed.shape[1] * 2))
        gate_up = getattr(module, "gate_up_packed", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
            experts.add((gate_up.shape[0], gate_up.shape[2] * 2, gate_up.shape[1] // 2))
    return sorted(linears), sorted(experts)


def _path_thresholds() -> tuple[int, ...]:
    """Token counts from which a step's kernels take another path: the linears' dequantize + cuBLAS, the MoE's
    grouped GEMMs, the router's two launches instead of the fused one (and beside the FFN inputs), the FP8 lm_head's tiles instead of its
    GEMV (also the counts of sampled rows)."""
    try:
        from nvfp4kit.kernels.ffn_router import FUSED_MAX_TOKENS
        from nvfp4kit.kernels.router import FUSED_ROUTE_MAX_TOKENS
        from nvfp4kit.kernels.w8a16_linear import GEMV_MAX_M
    except ModuleNotFoundError:  # no Triton: the torch backend has no such paths
        return ()
    return (
        DEQUANT_MIN_M,
        MOE_PREFILL_MIN_TOKENS,
        FUSED_ROUTE_MAX_TOKENS + 1,
        FUSED_MAX_TOKENS + 1,
        GEMV_MAX_M + 1,
    )


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


# ---- running it -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupReport:
    steps: int
    seconds: float
    compiles: int | None  # kernel variants compiled (or loaded from Triton's disk cache); None: not counted
    max_tokens: int  # the largest step's tokens


def warmup_wanted(warmup: bool | None, device: torch.device) -> bool:
    """`EngineConfig.warmup`: None means on CUDA only (on the CPU nothing is compiled, but the steps cost). On the
    H200 the 26B-A4B plan (27 steps) took 20.5 s on a cold Triton cache and 2.9 s from the cache."""
    return device.type == "cuda" if warmup is None else bool(warmup)


@torch.inference_mode()
def warm_up(engine: Engine, steps: list[WarmupStep] | None = None) -> WarmupReport:
    """Run `steps` (default: `engine_plan(engine)`) through the engine's forward on dummy tokens, leaving the
    KV pools, free lists and prefix cache as they were. The engine must be idle."""
    if engine.scheduler.has_work() or engine._in_flight is not None:
        raise RuntimeError("the warm-up needs an idle engine (no request queued or running)")
    t0 = time.perf_counter()
    steps = engine_plan(engine) if steps is None else steps
    counting = COMPILES.install()
    before = COMPILES.counts()[0]
    serving, COMPILES.ready = (
        COMPILES.ready,
        False,
    )  # (a warm-up after the engine was ready: its own compiles)
    gen = torch.Generator().manual_seed(0)
    with _ScratchKV(engine.cache) as (block, ring):
        for step in steps:
            _run_step(engine, step, block, ring, gen)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # a failing launch fails here, not in the first request
    COMPILES.ready = serving
    report = WarmupReport(
        steps=len(steps),
        seconds=time.perf_counter() - t0,
        compiles=COMPILES.counts()[0] - before if counting else None,
        max_tokens=max((s.tokens for s in steps), default=0),
    )
    log.info(
        "warm-up: %d steps of 1-%d tokens in %.1f s; %s kernel variants compiled or loaded from Triton's cache",
        report.steps, report.max_tokens, report.seconds, "uncounted" if report.compiles is None else report.compiles,
    )  # fmt: skip
    return report


def _run_step(engine: Engine, step: WarmupStep, block: int, ring: int, gen: torch.Generator) -> None:
    """One step as `Engine.step` runs it (every sequence sampled), all KV in the scratch block and ring."""
    blocks_for = engine.cache.blocks_for
    seqs, sampled, offset = [], [], 0
    for keys in step.decodes:
        seqs.append(SeqSlice(keys - 1, 1, offset, [block] * blocks_for(keys), ring))
        sampled.append(offset)
        offset += 1
    for start, n in step.prefills:
        seqs.append(SeqSlice(start, n, offset, [block] * blocks_for(start + n), ring))
        offset += n
        sampled.append(offset - 1)
    model, device = engine.model, engine.device
    ids = torch.randint(0, model.config.vocab_size, (offset,), generator=gen).to(device)
    ctx = BatchContext(model, engine.cache, seqs, device, backend=engine.config.attention_backend)
    hidden = model.hidden_states(ids, ctx)
    # the sampler's greedy argmax (two Triton launches on a GPU), which every serving step runs eagerly
    batch_sampler.greedy_table(model.logits(hidden[torch.tensor(sampled, device=device)]))


class _ScratchKV:
    """One global block and one sliding ring for the warm-up: never-used ones (no cached prefix is evicted),
    their rows zeroed for the warm-up (no NaN from stale bytes) and written back afterwards."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.saved: list[tuple[torch.Tensor, slice, torch.Tensor]] = []

    def __enter__(self) -> tuple[int, int]:
        cache = self.cache
        plain_blocks = getattr(cache.free_blocks, "plain", cache.free_blocks)
        plain_rings = getattr(cache.free_rings, "plain", cache.free_rings)
        if not plain_blocks or not plain_rings:
            raise RuntimeError("the warm-up needs one unused global block and one unused sliding ring")
        self.block, self.ring = cache.allocate_blocks(1)[0], cache.allocate_ring()
        layout, cfg = cache.layout, cache.cfg
        bs, rs = layout.block_size, layout.ring_size
        rows = {layer: slice(self.block * bs, (self.block + 1) * bs) for layer in layout.global_layers(cfg)}
        rows |= {layer: slice(self.ring * rs, (self.ring + 1) * rs) for layer in layout.sliding_layers(cfg)}
        for layer, where in rows.items():
            for store in (cache.keys.get(layer), cache.values[layer]):
                if store is not None:
                    self.saved.append((store, where, store[where].clone()))
                    store[where].zero_()
        return self.block, self.ring

    def __exit__(self, *exc_info: object) -> None:
        for store, where, rows in self.saved:
            store[where].copy_(rows)
        self.saved.clear()
        self.cache.free([self.block], self.ring)
