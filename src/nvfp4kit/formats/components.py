"""Which part of the model a checkpoint tensor belongs to, and how many weights it holds, from names alone.

Used by `inspect` and `plan` to account for sizes from safetensors headers without reading tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nvfp4kit.formats.safetensors_io import DTYPE_BYTES, TensorInfo

COMPONENTS = (
    "embeddings",  # embed_tokens (the tied lm_head)
    "lm_head",  # only when untied
    "attention",
    "dense_mlp",
    "experts",
    "router",
    "norms",
    "per_layer_embeddings",  # E2B/E4B PLE token tables
    "per_layer_projections",  # E2B/E4B PLE linears
    "vision",
    "audio",
    "other",
)
TOWER_COMPONENTS = ("vision", "audio")
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale", "weight_global_scale",
                  "input_global_scale")  # fmt: skip
_NORM_PART = re.compile(r".*norm(_\d+)?$")


def component_of(name: str) -> str:
    """The component of a checkpoint tensor, by its name (either Gemma 4 prefix)."""
    if "vision_tower" in name or "embed_vision" in name:
        return "vision"
    if "audio_tower" in name or "embed_audio" in name:
        return "audio"
    parts = name.split(".")
    if "layer_scalar" in parts or any(_NORM_PART.match(p) for p in parts):
        return "norms"
    if "embed_tokens_per_layer" in parts:
        return "per_layer_embeddings"
    if "embed_tokens" in parts:
        return "embeddings"
    if "lm_head" in parts:
        return "lm_head"
    if "experts" in parts:
        return "experts"
    if "router" in parts:
        return "router"
    if {"per_layer_model_projection", "per_layer_input_gate", "per_layer_projection"} & set(parts):
        return "per_layer_projections"
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "dense_mlp"
    return "other"


def logical_params(info: TensorInfo) -> int:
    """Weights a tensor holds: a packed uint8 byte is two FP4 values; quantization scales count for none."""
    if info.name.rsplit(".", 1)[-1] in SCALE_SUFFIXES:
        return 0
    numel = info.nbytes // DTYPE_BYTES.get(info.dtype, 1)
    return 2 * numel if info.dtype == "U8" else numel


@dataclass
class ComponentSizes:
    bytes: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    fp4_params: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, set[str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


def component_sizes(tensors: Iterable[TensorInfo]) -> ComponentSizes:
    """Bytes, weights (FP4 ones separately) and dtypes per component, in `COMPONENTS` order."""
    sizes = ComponentSizes()
    for t in sorted(tensors, key=lambda t: COMPONENTS.index(component_of(t.name))):
        comp = component_of(t.name)
        n = logical_params(t)
        sizes.bytes[comp] = sizes.bytes.get(comp, 0) + t.nbytes
        sizes.params[comp] = sizes.params.get(comp, 0) + n
        sizes.fp4_params[comp] = sizes.fp4_params.get(comp, 0) + (n if t.dtype == "U8" else 0)
        sizes.dtypes.setdefault(comp, set()).add(t.dtype)
    return sizes
