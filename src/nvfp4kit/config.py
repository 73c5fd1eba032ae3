"""Typed, frozen Gemma 4 text-tower config, read from a checkpoint's `config.json` or a preset.

Two on-disk forms exist: the multimodal one (`model_type: gemma4`, the text tower under `text_config`,
weights under `model.language_model.`) and the text-only one (`model_type: gemma4_text`, weights under
`model.`). Global (full-attention) layers may have their own head size and KV-head count: older configs
say so with `global_head_dim` / `num_global_key_value_heads`, transformers >= 5.23 writes a
`per_layer_config` keyed by layer index. Both are read into the same two fields here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "proportional")
GEMMA4_EOS_IDS = (1, 106, 50)  # <eos>, <turn|>, <|tool_response>


class ConfigError(ValueError):
    """The checkpoint's config is not a Gemma 4 text model we can run, or a value is unsupported."""


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class Gemma4TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers
    head_dim: int  # sliding layers
    global_head_dim: int
    num_global_key_value_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_sliding: RopeConfig = field(default_factory=RopeConfig)
    rope_full: RopeConfig = field(default_factory=lambda: RopeConfig("proportional", 1_000_000.0, 0.25))
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_k_eq_v: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = GEMMA4_EOS_IDS
    # Where the text tower's tensors live in the checkpoint ("model.language_model." or "model.").
    weight_prefix: str = "model."
    multimodal: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    # ---- per-layer views -------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.rope_sliding if self.is_sliding(layer) else self.rope_full

    def layer_has_v_proj(self, layer: int) -> bool:
        return not (self.attention_k_eq_v and not self.is_sliding(layer))

    def layer_intermediate_size(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_source_layer(layer) != layer
        return self.intermediate_size * (2 if wide else 1)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source_layer(self, layer: int) -> int:
        """The layer whose keys/values this layer attends over (itself unless KV is shared).

        The last `num_kv_shared_layers` layers compute no K/V; each reads the last earlier layer of its
        own type (the E2B/E4B design).
        """
        if layer < self.first_kv_shared_layer:
            return layer
        kind = self.layer_types[layer]
        for src in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[src] == kind:
                return src
        raise ConfigError(f"layer {layer} shares KV but no earlier {kind} layer produces it")

    @property
    def num_sliding_layers(self) -> int:
        return sum(1 for t in self.layer_types if t == SLIDING)

    @property
    def num_full_layers(self) -> int:
        return self.num_hidden_layers - self.num_sliding_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> Gemma4TextConfig:
        return replace(self, **changes)


def _validate(cfg: Gemma4TextConfig) -> None:
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ConfigError(
            f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is {cfg.num_hidden_layers}"
        )
    bad = {t for t in cfg.layer_types if t not in (SLIDING, FULL)}
    if bad:
        raise ConfigError(f"unsupported layer_types {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
    if cfg.hidden_activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"unsupported hidden_activation {cfg.hidden_activation!r}; Gemma 4 uses 'gelu_pytorch_tanh'"
        )
    for name, rope in (("sliding_attention", cfg.rope_sliding), ("full_attention", cfg.rope_full)):
        if rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {rope.rope_type!r} for {name}; supported: {SUPPORTED_ROPE_TYPES}"
            )
    for layer in range(cfg.num_hidden_layers):
        if cfg.num_attention_heads % cfg.layer_kv_heads(layer):
            raise ConfigError(
                f"layer {layer}: {cfg.num_attention_heads} attention heads are not a multiple of "
                f"{cfg.layer_kv_heads(layer)} KV heads"
            )
    if cfg.enable_moe_block and not (
        0 < cfg.top_k_experts <= cfg.num_experts and cfg.moe_intermediate_size > 0
    ):
        raise ConfigError(
            "enable_moe_block needs num_experts > 0, 0 < top_k_experts <= num_experts and moe_intermediate_size > 0"
        )
    if not 0 <= cfg.num_kv_shared_layers < cfg.num_hidden_layers:
        raise ConfigError(f"num_kv_shared_layers={cfg.num_kv_shared_layers} out of range")
    if cfg.hidden_size_per_layer_input and cfg.vocab_size_per_layer_input <= 0:
        raise ConfigError("hidden_size_per_layer_input needs vocab_size_per_layer_input > 0")


# ---- reading config.json ---------------------------------------------------------------------------

# The 12B ships as "gemma4_unified" (encoder-free vision); its text decoder is Gemma 4's dense one.
MULTIMODAL_TYPES = frozenset({"gemma4", "gemma4_unified"})
TEXT_TYPES = frozenset({"gemma4_text", "gemma4_unified_text"})


def _rope(params: dict[str, Any] | None, default: RopeConfig) -> RopeConfig:
    if not params:
        return default
    return RopeConfig(
        rope_type=params.get("rope_type", params.get("type", "default")),
        theta=float(params.get("rope_theta", default.theta)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
    )


def config_from_dict(
    raw: dict[str, Any], *, generation_config: dict[str, Any] | None = None
) -> Gemma4TextConfig:
    """Build the text config from a parsed `config.json` (either form)."""
    model_type = raw.get("model_type")
    if model_type in MULTIMODAL_TYPES:
        text = dict(raw.get("text_config") or {})
        if not text:
            raise ConfigError(f"model_type {model_type!r} config has no text_config")
        prefix, multimodal = "model.language_model.", True
    elif model_type in TEXT_TYPES:
        text, prefix, multimodal = dict(raw), "model.", False
    else:
        archs = raw.get("architectures") or []
        raise ConfigError(
            f"not a Gemma 4 checkpoint: model_type={model_type!r}, architectures={archs}; "
            f"expected one of {sorted(MULTIMODAL_TYPES | TEXT_TYPES)}"
        )

    if text.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported (no Gemma 4 model uses it)")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError("use_bidirectional_attention='all' (encoder-style) is not supported for generation")

    n_layers = int(text.get("num_hidden_layers", 30))
    layer_types = text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    layer_types = list(layer_types)
    layer_types[-1] = FULL  # transformers forces the last layer global

    head_dim = int(text.get("head_dim", 256))
    kv_heads = int(text.get("num_key_value_heads", 4))
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    per_layer = text.get("per_layer_config")
    if per_layer:
        full_ids = [i for i, t in enumerate(layer_types) if t == FULL]
        overrides = [per_layer.get(str(i), per_layer.get(i, {})) or {} for i in full_ids]
        dims = {int(o.get("head_dim", head_dim)) for o in overrides}
        heads = {int(o.get("num_key_value_heads", kv_heads)) for o in overrides}
        if len(dims) > 1 or len(heads) > 1:
            raise ConfigError(f"global layers with differing shapes are not supported: {per_layer}")
        global_head_dim, global_kv_heads = dims.pop(), heads.pop()
    else:
        global_head_dim = int(text.get("global_head_dim", 512))
        g = text.get("num_global_key_value_heads")
        global_kv_heads = int(g) if (g is not None and k_eq_v) else kv_heads

    rope = text.get("rope_parameters") or {}
    moe = bool(text.get("enable_moe_block", False))
    ple = int(text.get("hidden_size_per_layer_input") or 0)

    eos = (generation_config or {}).get("eos_token_id", text.get("eos_token_id", raw.get("eos_token_id")))
    if eos is None:
        eos_ids = GEMMA4_EOS_IDS
    else:
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))

    return Gemma4TextConfig(
        vocab_size=int(text.get("vocab_size", 262_144)),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(text["num_attention_heads"]),
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv_heads,
        layer_types=tuple(layer_types),
        sliding_window=int(text.get("sliding_window", 512)),
        rope_sliding=_rope(rope.get(SLIDING), RopeConfig()),
        rope_full=_rope(rope.get(FULL), RopeConfig("proportional", 1_000_000.0, 0.25)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=text.get("final_logit_softcapping"),
        hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
        attention_k_eq_v=k_eq_v,
        enable_moe_block=moe,
        num_experts=int(text.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(text.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(text.get("moe_intermediate_size") or 0) if moe else 0,
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 0) if ple else 0,
        num_kv_shared_layers=int(text.get("num_kv_shared_layers") or 0),
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        pad_token_id=int(text.get("pad_token_id", 0) or 0),
        bos_token_id=int(text.get("bos_token_id", 2) or 2),
        eos_token_ids=eos_ids,
        weight_prefix=prefix,
        multimodal=multimodal,
    )


def load_config(path: str | Path) -> Gemma4TextConfig:
    """Read `config.json` (and `generation_config.json` for the stop ids) from a checkpoint folder."""
    folder = Path(path)
    cfg_file = folder / "config.json" if folder.is_dir() else folder
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file} is not valid JSON: {exc}") from exc
    gen_file = cfg_file.parent / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    return config_from_dict(raw, generation_config=gen)


# ---- presets ----------------------------------------------------------------------------------------

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Gemma4TextConfig:
    """A preset's text config (`gemma-4-26b-a4b`, `gemma-4-31b`, ...); see presets/*.json for sources."""
    file = PRESET_DIR / f"{name}.json"
    if not file.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    raw = json.loads(file.read_text())
    return config_from_dict(raw["config"], generation_config=raw.get("generation_config"))
