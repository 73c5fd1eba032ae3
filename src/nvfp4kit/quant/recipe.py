"""What gets quantized: the recipe, as HF module names of one Gemma 4 text tower.

Default (`all-nvfp4`, the seed checkpoint's recipe): every linear of the text decoder is NVFP4: attention
q/k/v/o, the dense MLP, every expert projection, and the per-layer-input projections of E2B/E4B. BF16 stays
BF16 for embeddings and the tied lm_head, MoE routers, and the vision/audio towers with their embedding
projections. `attention-bf16` also keeps q/k/v/o in BF16 (NVIDIA's own checkpoints do). Extra exclusions are
fnmatch patterns over module names (`*layers.0.*`, `*.mlp.down_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.quant.calib_methods import CALIBRATION_METHODS

RECIPES = ("all-nvfp4", "attention-bf16")
CALIBRATIONS = tuple(CALIBRATION_METHODS)  # max, mse, mse-output, gptq (see calib_methods)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class RecipeError(ValueError):
    """A recipe option is unknown, or its exclusions would split a group that must share scales."""


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input and so share weight_scale_2 and input_scale (q/k/v, gate/up)."""

    modules: tuple[
        str, ...
    ]  # HF module names without the checkpoint prefix, e.g. "layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class LayerPlan:
    """The linears of one decoder layer and whether each is quantized."""

    groups: tuple[LinearGroup, ...]  # dense linears, fused groups first in their model order
    quantized: frozenset[str]
    experts: str | None  # "layers.i.experts" when the layer has MoE experts
    experts_quantized: bool

    def is_quantized(self, module: str) -> bool:
        return module in self.quantized


@dataclass(frozen=True)
class QuantRecipe:
    name: str = "all-nvfp4"
    exclude: tuple[str, ...] = ()
    calibration: str = "max"

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise RecipeError(f"unknown recipe {self.name!r}; choose from {', '.join(RECIPES)}")
        if self.calibration not in CALIBRATIONS:
            raise RecipeError(
                f"unknown calibration {self.calibration!r}; choose from {', '.join(CALIBRATIONS)}"
            )

    def excludes(self, module: str, *, prefix: str = "") -> bool:
        """Whether a text linear stays BF16; patterns match the full checkpoint module name or the short one."""
        if (
            self.name == "attention-bf16"
            and module.rsplit(".", 1)[-1] in ATTENTION
            and ".self_attn." in module
        ):
            return True
        full = prefix + module
        return any(fnmatchcase(full, p) or fnmatchcase(module, p) for p in self.exclude)

    def layer_plan(self, cfg: Gemma4TextConfig, layer: int, *, prefix: str = "") -> LayerPlan:
        p = f"layers.{layer}."
        qkv = [p + "self_attn.q_proj"]
        if cfg.kv_source_layer(layer) == layer:
            qkv.append(p + "self_attn.k_proj")
            if cfg.layer_has_v_proj(layer):
                qkv.append(p + "self_attn.v_proj")
        groups = [
            LinearGroup(tuple(qkv)),
            LinearGroup((p + "self_attn.o_proj",)),
            LinearGroup((p + "mlp.gate_proj", p + "mlp.up_proj")),
            LinearGroup((p + "mlp.down_proj",)),
        ]
        if cfg.hidden_size_per_layer_input:
            groups += [LinearGroup((p + "per_layer_input_gate",)), LinearGroup((p + "per_layer_projection",))]
        quantized = set()
        for group in groups:
            kept = [m for m in group.modules if not self.excludes(m, prefix=prefix)]
            if kept and len(kept) != len(group.modules):
                raise RecipeError(
                    f"exclusions split the fused group {[prefix + m for m in group.modules]}: our model runs "
                    "them as one matmul, so exclude all of them or none"
                )
            quantized.update(kept)
        experts = p + "experts" if cfg.enable_moe_block else None
        experts_quantized = False
        if experts is not None:
            names = [
                f"{experts}.{e}.{proj}"
                for e in range(cfg.num_experts)
                for proj in ("gate_proj", "up_proj", "down_proj")
            ]
            hits = [self.excludes(n, prefix=prefix) or self.excludes(experts, prefix=prefix) for n in names]
            if any(hits) and not all(hits):
                raise RecipeError(
                    f"exclusions cover some but not all of {prefix}{experts}.*: the experts of a layer are stacked "
                    "into one tensor, so exclude all of them or none"
                )
            experts_quantized = not any(hits)
        return LayerPlan(tuple(groups), frozenset(quantized), experts, experts_quantized)

    def model_level_quantized(self, cfg: Gemma4TextConfig, *, prefix: str = "") -> list[str]:
        """Quantized linears outside the decoder layers (E2B/E4B's per-layer-input projection)."""
        if cfg.hidden_size_per_layer_input and not self.excludes("per_layer_model_projection", prefix=prefix):
            return ["per_layer_model_projection"]
        return []
