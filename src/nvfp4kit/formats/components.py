"""Which part of the model a checkpoint tensor belongs to, and how many weights it holds, from names alone.

Used by `inspect` and `plan` to account for sizes from safetensors headers without reading tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nvfp4kit.formats.safetensors_io import DTYPE_BYTES, TensorInfo

COMPONENTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "experts",
    "router",
    "norms",
    "per_layer",
    "vision_audio",
    "other",
)

_RULES = (
    (r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\.", "vision_audio"),
    (r"embed_tokens_per_layer|per_layer_model_projection|per_layer_projection_norm|per_layer_input_gate"
     r"|per_layer_projection\.|post_per_layer_input_norm", "per_layer"),
    (r"(^|\.)embed_tokens\.|^lm_head\.", "embedding"),
    (r"\.self_attn\.(q|k|v|o)_proj\.", "attention"),
    (r"\.experts\.", "experts"),
    (r"\.router\.", "router"),
    (r"\.mlp\.(gate|up|down)_proj\.", "dense_mlp"),
    (r"norm(_\d)?\.weight$|layer_scalar$", "norms"),
)  # fmt: skip

_SCALE_SUFFIXES = (
    "weight_scale",
    "weight_scale_2",
    "input_scale",
    "weight_global_scale",
    "input_global_scale",
)


def component_of(name: str) -> str:
    for pattern, component in _RULES:
        if re.search(pattern, name):
            return component
    return "other"


def is_packed_fp4(info: TensorInfo, names: set[str]) -> bool:
    """A uint8 weight with an fp8 block scale beside it holds two FP4 values per byte."""
    if info.dtype != "U8":
        return False
    base = info.name.rsplit(".", 1)[0]
    return f"{base}.weight_scale" in names


@dataclass
class ComponentSizes:
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    params: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    dtypes: dict[str, set[str]] = field(default_factory=lambda: {c: set() for c in COMPONENTS})
    fp4_params: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


def component_sizes(tensors: Iterable[TensorInfo]) -> ComponentSizes:
    """Bytes and parameter counts per component; scale tensors count as bytes, not as parameters."""
    tensors = list(tensors)
    names = {t.name for t in tensors}
    sizes = ComponentSizes()
    for t in tensors:
        comp = component_of(t.name)
        sizes.bytes[comp] += t.nbytes
        sizes.dtypes[comp].add(t.dtype)
        if t.name.endswith(_SCALE_SUFFIXES):
            continue
        count = t.nbytes // DTYPE_BYTES.get(t.dtype, 1)
        if is_packed_fp4(t, names):
            count *= 2
            sizes.fp4_params[comp] += count
        sizes.params[comp] += count
    return sizes
