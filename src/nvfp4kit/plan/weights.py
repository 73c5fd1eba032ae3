"""Weight bytes of a Gemma 4 text tower by component, for a quantization recipe, from its config alone.

One NVFP4 linear [N, K] stores N*K/2 packed bytes, N*K/16 FP8 block scales, a 4-byte `weight_scale_2` and a
4-byte `input_scale` (ModelOpt's export writes one set per projection, experts unfused). Everything else is
BF16: the tied embeddings / lm_head, routers, norms and the per-layer-embedding (PLE) tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.components import COMPONENTS, TOWER_COMPONENTS

BF16_BYTES = 2

# Which components a recipe stores in NVFP4 (every other tensor is BF16).
RECIPES: dict[str, frozenset[str]] = {
    "all-nvfp4": frozenset({"attention", "dense_mlp", "experts", "per_layer_projections"}),  # the seed's
    "attention-bf16": frozenset({"dense_mlp", "experts", "per_layer_projections"}),
    # nvidia/Gemma-4-26B-A4B-NVFP4 as the seed card describes it (self-attention and dense MLP BF16)
    "experts-only": frozenset({"experts"}),
    "bf16": frozenset(),
}


def nvfp4_linear_bytes(out_features: int, in_features: int) -> int:
    """Packed E2M1 + FP8 block scales + weight_scale_2 + input_scale of one [out, in] linear."""
    if in_features % 16:
        raise ValueError(
            f"NVFP4 needs the input dim to be a multiple of 16, got a [{out_features}, {in_features}]"
        )
    n = out_features * in_features
    return n // 2 + n // 16 + 4 + 4


@dataclass(frozen=True)
class MatrixGroup:
    """`count` linears of the same [out, in] shape belonging to one component."""

    component: str
    name: str
    out_features: int
    in_features: int
    count: int = 1

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count

    def nbytes(self, *, nvfp4: bool) -> int:
        if nvfp4:
            return nvfp4_linear_bytes(self.out_features, self.in_features) * self.count
        return self.params * BF16_BYTES


def linear_groups(cfg: Gemma4TextConfig) -> list[MatrixGroup]:
    """Every linear of the text tower the model runs (KV-shared layers have no k/v projections)."""
    h = cfg.hidden_size
    groups: list[MatrixGroup] = []
    for layer in range(cfg.num_hidden_layers):
        hd, kvh = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
        q = cfg.num_attention_heads * hd
        groups.append(MatrixGroup("attention", f"layers.{layer}.q_proj", q, h))
        if cfg.kv_source_layer(layer) == layer:
            groups.append(MatrixGroup("attention", f"layers.{layer}.k_proj", kvh * hd, h))
            if cfg.layer_has_v_proj(layer):
                groups.append(MatrixGroup("attention", f"layers.{layer}.v_proj", kvh * hd, h))
        groups.append(MatrixGroup("attention", f"layers.{layer}.o_proj", h, q))
        inter = cfg.layer_intermediate_size(layer)
        groups.append(MatrixGroup("dense_mlp", f"layers.{layer}.gate_up_proj", inter, h, count=2))
        groups.append(MatrixGroup("dense_mlp", f"layers.{layer}.down_proj", h, inter))
        if cfg.enable_moe_block:
            e, mi = cfg.num_experts, cfg.moe_intermediate_size
            groups.append(MatrixGroup("experts", f"layers.{layer}.experts.gate_up", mi, h, count=2 * e))
            groups.append(MatrixGroup("experts", f"layers.{layer}.experts.down", h, mi, count=e))
            groups.append(MatrixGroup("router", f"layers.{layer}.router.proj", e, h))
        if cfg.hidden_size_per_layer_input:
            p = cfg.hidden_size_per_layer_input
            groups.append(MatrixGroup("per_layer_projections", f"layers.{layer}.per_layer_input_gate", p, h))
            groups.append(MatrixGroup("per_layer_projections", f"layers.{layer}.per_layer_projection", h, p))
    if cfg.hidden_size_per_layer_input:
        n_ple = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
        groups.append(MatrixGroup("per_layer_projections", "per_layer_model_projection", n_ple, h))
    return groups


def other_params(cfg: Gemma4TextConfig) -> dict[str, int]:
    """Parameters that are never quantized: embeddings, norms, router vectors, PLE tables, layer scalars."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out = dict.fromkeys(("embeddings", "lm_head", "router", "norms", "per_layer_embeddings"), 0)
    out["embeddings"] = v * h
    out["lm_head"] = 0 if cfg.tie_word_embeddings else v * h
    norms = h  # final norm
    for layer in range(cfg.num_hidden_layers):
        norms += 4 * h + cfg.layer_head_dim(layer) + 1  # 4 layer norms, q_norm, layer_scalar
        if cfg.kv_source_layer(layer) == layer:
            norms += cfg.layer_head_dim(layer)  # k_norm (v_norm has no weight)
        if cfg.enable_moe_block:
            norms += 3 * h  # pre_feedforward_layernorm_2, post_feedforward_layernorm_1/_2
            out["router"] += h + cfg.num_experts  # router.scale, router.per_expert_scale
        if cfg.hidden_size_per_layer_input:
            norms += h  # post_per_layer_input_norm
    if cfg.hidden_size_per_layer_input:
        p = cfg.hidden_size_per_layer_input
        norms += p  # per_layer_projection_norm
        out["per_layer_embeddings"] = cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * p
    out["norms"] = norms
    return out


@dataclass(frozen=True)
class WeightBreakdown:
    """Bytes and parameters per component; `formats` says how each component is stored."""

    recipe: str
    source: str  # "config" or "checkpoint headers"
    bytes_by_component: dict[str, int] = field(default_factory=dict)
    params_by_component: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def text_bytes(self) -> int:
        return sum(b for c, b in self.bytes_by_component.items() if c not in TOWER_COMPONENTS)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_component.values())

    def get(self, component: str) -> int:
        return self.bytes_by_component.get(component, 0)


def check_recipe(recipe: str) -> frozenset[str]:
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}") from None


def weights_from_config(cfg: Gemma4TextConfig, *, recipe: str = "all-nvfp4") -> WeightBreakdown:
    """Bytes the text tower's weights take on the GPU under `recipe` (no vision/audio towers)."""
    quantized = check_recipe(recipe)
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}
    for comp, n in other_params(cfg).items():
        if n:
            nbytes[comp] = n * BF16_BYTES
            params[comp] = n
    for group in linear_groups(cfg):
        nvfp4 = group.component in quantized
        nbytes[group.component] = nbytes.get(group.component, 0) + group.nbytes(nvfp4=nvfp4)
        params[group.component] = params.get(group.component, 0) + group.params
    formats = {c: ("nvfp4" if c in quantized else "bf16") for c in nbytes}
    order = {c: i for i, c in enumerate(COMPONENTS)}
    nbytes = dict(sorted(nbytes.items(), key=lambda kv: order[kv[0]]))
    params = {c: params[c] for c in nbytes}
    return WeightBreakdown(recipe, "config", nbytes, params, formats)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: all but the (E - top_k) experts a token does not use
    by_component: dict[str, int]


def parameter_counts(cfg: Gemma4TextConfig) -> ParamCounts:
    """Text-tower parameters (tied embeddings counted once) and those one token touches."""
    by_component = weights_from_config(cfg, recipe="bf16").params_by_component
    total = sum(by_component.values())
    experts = by_component.get("experts", 0)
    active = total - experts
    if cfg.enable_moe_block:
        active += experts * cfg.top_k_experts // cfg.num_experts
    return ParamCounts(total, active, by_component)


def expert_bytes(cfg: Gemma4TextConfig, weights: WeightBreakdown) -> int:
    """Bytes of one expert (gate, up and down) of one layer, as stored."""
    if not cfg.enable_moe_block:
        return 0
    return weights.get("experts") // (cfg.num_hidden_layers * cfg.num_experts)


# `--linear-copies` (engine/linear_copies.py): BF16 copies of the NVFP4 linears outside the experts, which cuBLAS
# reads at steps of many tokens; `auto` keeps them where they take at most this share of the card's memory
LINEAR_COPY_COMPONENTS = frozenset({"attention", "dense_mlp", "per_layer_projections"})
LINEAR_COPIES_MAX_SHARE = 0.05


def linear_copy_bytes(cfg: Gemma4TextConfig, *, recipe: str = "all-nvfp4") -> int:
    """Bytes the copies take for a model quantized by `recipe` (a linear already in BF16 needs none)."""
    nvfp4 = check_recipe(recipe) & LINEAR_COPY_COMPONENTS
    return sum(BF16_BYTES * g.params for g in linear_groups(cfg) if g.component in nvfp4)


def linear_copies_auto(copy_bytes: int, memory_bytes: int) -> bool:
    """What `--linear-copies auto` picks on a card of `memory_bytes` (one process)."""
    return 0 < copy_bytes <= LINEAR_COPIES_MAX_SHARE * memory_bytes
