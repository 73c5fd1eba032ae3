"""Tensor/expert parallel arithmetic: what each of N ranks holds of a Gemma 4 text tower, and its bytes.

The rules (docs/parallel.md says why):
- attention by heads: the q heads split evenly (N must divide them). A layer type's KV heads split evenly when N
  divides them; when N is a multiple of them instead (the 26B-A4B global layers' 2 KV heads on 4 GPUs), each
  rank holds the one KV head its q heads read, and N / kv_heads ranks hold each KV head (replicated). Any other
  count is refused.
- dense MLP: gate/up split by output rows, down by input columns, evenly.
- MoE: experts split across ranks (expert parallel, `moe="experts"`, the default), the first `E % N` ranks one
  more: uneven is fine. Or `moe="tensor"`: every rank holds every expert's slice of the MoE width (gate/up
  rows, down columns; NVFP4: width/N a multiple of 16), as the dense MLP.
- embeddings and lm_head: vocab-parallel, ceil(V / N) rows a rank (the last may hold fewer).
- everything else (norms, router, per-layer-embedding tables and projections) is replicated.
NVFP4 shards keep their block scales aligned: a split along a linear's input dim (o_proj, down_proj) must cut
at multiples of the 16-element block, or the checkpoint is refused with the sizes that fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.nvfp4 import BLOCK
from nvfp4kit.formats.safetensors_io import TensorInfo
from nvfp4kit.plan.kv import kv_bytes_per_token
from nvfp4kit.plan.weights import WeightBreakdown

_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(r"experts\.\d+\.(gate|up|down)_proj$")
_QUANT_SUFFIXES = ("weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale", "k_scale",
                   "v_scale")  # fmt: skip


_UNREAD_SUFFIXES = ("input_scale", "input_global_scale", "k_scale", "v_scale")


class ShardingError(ValueError):
    """The model cannot be split over this many ranks by the rules above."""


MOE_MODES = ("experts", "tensor")


@dataclass(frozen=True)
class TensorSlice:
    """The part of a checkpoint tensor one rank reads: [start, stop) along `dim`, then `also` ([start, stop)
    along the same dim) after it: the up half of a fused gate_up."""

    dim: int
    start: int
    stop: int
    also: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start + (self.also[1] - self.also[0] if self.also else 0)


def even_part(size: int, world: int, rank: int, *, what: str) -> tuple[int, int]:
    if size % world:
        raise ShardingError(f"{what}: {size} does not split evenly over {world} ranks")
    step = size // world
    return rank * step, (rank + 1) * step


@dataclass(frozen=True)
class ParallelLayout:
    """How `cfg` splits over `world` ranks; `check` refuses what the rules cannot split."""

    cfg: Gemma4TextConfig
    world: int
    moe: str = "experts"  # or "tensor" (see the module docstring)

    def check(self, *, nvfp4: bool) -> ParallelLayout:
        """Raise `ShardingError` naming every size that does not split; `nvfp4`: linears are quantized."""
        cfg, n = self.cfg, self.world
        problems = []
        if n < 1:
            problems.append(f"tensor_parallel_size must be >= 1, got {n}")
            raise ShardingError("; ".join(problems))
        if cfg.num_attention_heads % n:
            problems.append(f"{cfg.num_attention_heads} attention heads do not split evenly over {n} ranks")
        for kind, heads in (("sliding", cfg.num_key_value_heads), ("global", cfg.num_global_key_value_heads)):
            if heads % n and n % heads:
                problems.append(
                    f"{heads} {kind}-layer KV heads: {n} ranks neither divide them nor are a multiple of them"
                )
        for size in sorted({cfg.layer_intermediate_size(i) for i in range(cfg.num_hidden_layers)}):
            if size % n:
                problems.append(f"dense MLP intermediate size {size} does not split evenly over {n} ranks")
            elif nvfp4 and (size // n) % BLOCK:
                problems.append(
                    f"dense MLP intermediate size {size} / {n} ranks = {size // n} is not a multiple of the "
                    f"NVFP4 block ({BLOCK}): down_proj's block scales would straddle two ranks"
                )
        if not problems and nvfp4:
            for layer in range(cfg.num_hidden_layers):
                local = cfg.num_attention_heads // n * cfg.layer_head_dim(layer)
                if local % BLOCK:
                    problems.append(
                        f"layer {layer}: o_proj's {local} input columns per rank are not a multiple of the "
                        f"NVFP4 block ({BLOCK})"
                    )
                    break
        if self.moe not in MOE_MODES:
            problems.append(f"unknown MoE split {self.moe!r}; choose from {MOE_MODES}")
        elif cfg.enable_moe_block and self.moe == "experts" and cfg.num_experts < n:
            problems.append(f"{cfg.num_experts} experts cannot give each of {n} ranks one")
        elif cfg.enable_moe_block and self.moe == "tensor":
            width = cfg.moe_intermediate_size
            if width % n or (nvfp4 and (width // n) % BLOCK):
                problems.append(
                    f"MoE intermediate size {width} does not split over {n} ranks"
                    + (f" into multiples of the NVFP4 block ({BLOCK})" if nvfp4 else "")
                )
        if problems:
            raise ShardingError(f"cannot split this model over {n} ranks: " + "; ".join(problems))
        return self

    # ---- what a rank holds ---------------------------------------------------------------------------
    def kv_heads(self, layer: int) -> int:
        """KV heads each rank holds on `layer` (1 when they are replicated)."""
        heads = self.cfg.layer_kv_heads(layer)
        return heads // self.world if heads % self.world == 0 else 1

    def kv_head_range(self, layer: int, rank: int) -> tuple[int, int]:
        """[first, stop) of the KV heads rank `rank` holds on `layer`."""
        heads = self.cfg.layer_kv_heads(layer)
        if heads % self.world == 0:
            local = heads // self.world
            return rank * local, (rank + 1) * local
        first = rank // (self.world // heads)  # the KV head its q heads read
        return first, first + 1

    def replicates_kv(self, layer: int) -> bool:
        return self.cfg.layer_kv_heads(layer) % self.world != 0

    def expert_range(self, rank: int) -> range:
        """The experts rank `rank` holds (all of them, each in part, when the MoE splits by width)."""
        if self.moe == "tensor":
            return range(self.cfg.num_experts)
        base, extra = divmod(self.cfg.num_experts, self.world)
        first = rank * base + min(rank, extra)
        return range(first, first + base + (1 if rank < extra else 0))

    def vocab_range(self, rank: int) -> range:
        rows = -(-self.cfg.vocab_size // self.world)
        return range(min(rank * rows, self.cfg.vocab_size), min((rank + 1) * rows, self.cfg.vocab_size))

    def local_config(self) -> Gemma4TextConfig:
        """The config each rank's model is built from: its heads and MLP width; experts and vocab stay global
        (the router scores all experts; the rank's expert subset and vocab rows are set on the model)."""
        cfg, n = self.cfg, self.world
        sliding = cfg.num_key_value_heads // n if cfg.num_key_value_heads % n == 0 else 1
        full = cfg.num_global_key_value_heads // n if cfg.num_global_key_value_heads % n == 0 else 1
        moe_width = cfg.moe_intermediate_size // (n if self.moe == "tensor" else 1)
        return cfg.with_(
            num_attention_heads=cfg.num_attention_heads // n,
            num_key_value_heads=sliding,
            num_global_key_value_heads=full,
            intermediate_size=cfg.intermediate_size // n,
            moe_intermediate_size=moe_width,
        )

    def tensor_slice(self, name: str, shape: tuple[int, ...], rank: int) -> TensorSlice | None:
        """What rank `rank` reads of checkpoint tensor `name` (without the text prefix) of `shape`; None: all
        of it. Packed NVFP4 weights ([N, K/2]) and block scales ([N, K/16]) split like their dense weight."""
        if name in ("embed_tokens.weight", "lm_head.weight"):
            rows = self.vocab_range(rank)
            return TensorSlice(0, rows.start, rows.stop)
        match = _LAYER.match(name)
        if match is None or name.rsplit(".", 1)[-1] in _QUANT_SUFFIXES:
            return None
        layer, rest = int(match.group(1)), match.group(2)
        module, _, part = rest.rpartition(".")
        if rest in ("experts.gate_up_proj", "experts.down_proj"):  # transformers' fused [E, ., .] layout
            if self.moe == "tensor" and rest == "experts.gate_up_proj":  # [E, gate I | up I, H]
                a, b = even_part(shape[1] // 2, self.world, rank, what=name)
                return TensorSlice(1, a, b, also=(shape[1] // 2 + a, shape[1] // 2 + b))
            if self.moe == "tensor":  # down [E, H, I]
                return TensorSlice(2, *even_part(shape[2], self.world, rank, what=name))
            experts = self.expert_range(rank)
            return TensorSlice(0, experts.start, experts.stop)
        if part not in ("weight", "weight_packed", "weight_scale"):
            return None
        split_experts = self.moe == "tensor" and _PER_EXPERT.match(module)
        if split_experts:  # one expert's own gate_proj / up_proj / down_proj (ModelOpt): as the dense MLP
            module = "mlp." + module.rsplit(".", 1)[-1]
        if module == "self_attn.q_proj" or module in ("mlp.gate_proj", "mlp.up_proj"):
            return TensorSlice(0, *even_part(shape[0], self.world, rank, what=name))
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            first, stop = self.kv_head_range(layer, rank)
            per_head = shape[0] // self.cfg.layer_kv_heads(layer)
            return TensorSlice(0, first * per_head, stop * per_head)
        if module in ("self_attn.o_proj", "mlp.down_proj"):
            return TensorSlice(1, *even_part(shape[1], self.world, rank, what=name))
        return None

    # ---- bytes per rank ------------------------------------------------------------------------------
    def rank_tensor_bytes(self, info: TensorInfo, rank: int, *, prefix: str) -> int:
        """Bytes of one checkpoint tensor that rank `rank` loads (as stored; activation and KV scales, which a
        W4A16 engine with a BF16 cache never reads, count for none)."""
        name = info.name.removeprefix(prefix)
        if name.rsplit(".", 1)[-1] in _UNREAD_SUFFIXES:
            return 0
        per_expert = re.match(r"layers\.\d+\.experts\.(\d+)\.", name)
        if per_expert is not None and self.moe == "experts":  # ModelOpt writes experts one by one
            return info.nbytes if int(per_expert.group(1)) in self.expert_range(rank) else 0
        part = self.tensor_slice(name, info.shape, rank)
        if part is None or not info.shape:
            return info.nbytes
        return info.nbytes * part.size // info.shape[part.dim]

    def busiest_rank_weights(self, full: WeightBreakdown, local: WeightBreakdown) -> int:
        """Bytes the fullest rank holds, from config-based breakdowns of the whole model (`full`) and of
        `local_config()` (`local`: its attention and dense MLP are already one rank's)."""
        cfg = self.cfg
        out = 0
        for component, nbytes in full.bytes_by_component.items():
            if component in ("attention", "dense_mlp") or (component == "experts" and self.moe == "tensor"):
                out += local.get(component)
            elif component == "experts":
                out += nbytes * len(self.expert_range(0)) // max(cfg.num_experts, 1)
            elif component in ("embeddings", "lm_head"):
                out += nbytes * len(self.vocab_range(0)) // cfg.vocab_size
            elif component not in ("vision", "audio"):
                out += nbytes
        return out


def checkpoint_rank_bytes(layout: ParallelLayout, tensors: Iterable[TensorInfo], *, prefix: str) -> list[int]:
    """Text-tower bytes each rank loads from a checkpoint's tensors (vision/audio towers excluded)."""
    tensors = [t for t in tensors if "vision" not in t.name and "audio" not in t.name]
    return [sum(layout.rank_tensor_bytes(t, r, prefix=prefix) for t in tensors) for r in range(layout.world)]


def parallel_summary(
    layout: ParallelLayout, *, weights_per_rank: list[int], kv_dtype: str, k_eq_v_once: bool = True
) -> dict[str, Any]:
    """Per-GPU numbers for `plan --tensor-parallel-size N`: what each rank holds and its KV bytes per token."""
    local = layout.local_config()
    kv = kv_bytes_per_token(local, kv_dtype=kv_dtype, k_eq_v_once=k_eq_v_once)
    whole = kv_bytes_per_token(layout.cfg, kv_dtype=kv_dtype, k_eq_v_once=k_eq_v_once)
    replicated = sorted({"sliding" if layout.cfg.is_sliding(i) else "global"
                         for i in range(layout.cfg.num_hidden_layers) if layout.replicates_kv(i)})  # fmt: skip
    return {
        "tensor_parallel_size": layout.world,
        "moe": layout.moe,
        "q_heads_per_rank": local.num_attention_heads,
        "kv_heads_per_rank": {
            "sliding": local.num_key_value_heads,
            "global": local.num_global_key_value_heads,
        },
        "kv_replicated": replicated,
        "experts_per_rank": [len(layout.expert_range(r)) for r in range(layout.world)]
        if layout.cfg.enable_moe_block
        else None,
        "vocab_rows_per_rank": len(layout.vocab_range(0)),
        "weights_per_rank": weights_per_rank,
        "kv_bytes_per_token": {"sliding": kv.sliding, "global": kv.full},
        "kv_bytes_per_token_one_gpu": {"sliding": whole.sliding, "global": whole.full},
    }


def parallel_plan(
    model: str,
    world: int,
    *,
    free_bytes: int,
    kv_dtype: str = "fp8_e5m2",
    recipe: str = "all-nvfp4",
    prefill_chunk: int | None = None,
    context: int | None = None,
    sliding_limit: int | None = None,
) -> dict[str, Any]:
    """`plan --tensor-parallel-size N`: each GPU's weights, KV bytes per token and pools, with `free_bytes`
    free on every GPU before loading (the vision tower is left out: images are not served under TP yet);
    `sliding_limit`: the cap on a sliding-layer pass (`plan.pools.default_sliding_chunk` of the card)."""
    from nvfp4kit.plan.pools import DEFAULT_PREFILL_CHUNK, plan_pools
    from nvfp4kit.plan.report import resolve_model
    from nvfp4kit.plan.weights import weights_from_config

    source = resolve_model(model)
    cfg = source.cfg
    if source.checkpoint is not None:
        from nvfp4kit.formats.safetensors_io import CheckpointReader

        tensors = list(CheckpointReader(source.checkpoint).tensors.values())
        nvfp4 = any(t.dtype == "U8" for t in tensors)
        layout = ParallelLayout(cfg, world).check(nvfp4=nvfp4)
        per_rank = checkpoint_rank_bytes(layout, tensors, prefix=cfg.weight_prefix)
    else:
        layout = ParallelLayout(cfg, world).check(nvfp4=recipe != "bf16")
        full = weights_from_config(cfg, recipe=recipe)
        local = weights_from_config(layout.local_config(), recipe=recipe)
        per_rank = [layout.busiest_rank_weights(full, local)] * world
    summary = parallel_summary(layout, weights_per_rank=per_rank, kv_dtype=kv_dtype)
    pools = plan_pools(
        layout.local_config(), free_bytes=free_bytes, weights_bytes=max(per_rank), kv_dtype=kv_dtype,
        prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK, context=context, sliding_limit=sliding_limit,
    )  # fmt: skip
    summary.update(
        free_bytes_per_gpu=free_bytes,
        kv_budget_per_gpu=pools.kv_budget_bytes,
        max_context=pools.max_context,
        global_tokens=pools.global_tokens,
        fits=pools.fits,
    )
    return summary


def format_parallel(summary: dict[str, Any]) -> str:
    """The per-GPU block `plan --tensor-parallel-size N` prints after the one-GPU plan."""
    from nvfp4kit.plan.units import GiB

    n = summary["tensor_parallel_size"]
    kv, one = summary["kv_bytes_per_token"], summary["kv_bytes_per_token_one_gpu"]
    heads = summary["kv_heads_per_rank"]
    replicated = (
        f" (replicated: {', '.join(summary['kv_replicated'])} layers)" if summary["kv_replicated"] else ""
    )
    lines = [
        "",
        f"Per GPU with --tensor-parallel-size {n} (one process per GPU, every GPU alike)",
        f"  q heads {summary['q_heads_per_rank']}, KV heads sliding {heads['sliding']} / global "
        f"{heads['global']}{replicated}, vocab rows {summary['vocab_rows_per_rank']:,}",
    ]
    if summary["experts_per_rank"]:
        lines.append(f"  experts per GPU: {', '.join(map(str, summary['experts_per_rank']))}")
    weights = ", ".join(f"{b / GiB:.2f}" for b in summary["weights_per_rank"])
    lines += [
        f"  weights per GPU (GiB): {weights}",
        f"  KV bytes per token per GPU: sliding {kv['sliding']:,}, global {kv['global']:,} "
        f"(one GPU: {one['sliding']:,} / {one['global']:,})",
        f"  KV budget per GPU {summary['kv_budget_per_gpu'] / GiB:.2f} GiB of {summary['free_bytes_per_gpu'] / GiB:.2f} "
        f"GiB free -> longest request {summary['max_context']:,} tokens, global pool {summary['global_tokens']:,} "
        f"tokens{'' if summary['fits'] else ' (DOES NOT FIT)'}",
    ]
    return "\n".join(lines)
