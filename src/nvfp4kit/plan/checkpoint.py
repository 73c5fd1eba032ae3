"""Weight bytes of a checkpoint folder by component, read from safetensors headers only (no tensor data).

A safetensors file starts with an 8-byte little-endian header length and a JSON header giving each tensor's
dtype, shape and byte range; summing the byte ranges gives exactly what the tensors occupy.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from nvfp4kit.plan.weights import COMPONENTS, WeightBreakdown

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
FLOAT_DTYPES = ("BF16", "F16", "F32")
_NORM_PART = re.compile(r".*norm(_\d+)?$")


@dataclass(frozen=True)
class HeaderTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> list[HeaderTensor]:
    """Tensors listed in one file's header, each checked against the file size and its dtype x shape."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path}: corrupt safetensors header (claims {length} bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    tensors = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r} lies past the end of the file (truncated shard?)")
        numel = 1
        for d in shape:
            numel *= d
        elem = DTYPE_BYTES.get(info["dtype"])
        if elem is not None and numel * elem != end - begin:
            raise ValueError(
                f"{path}: tensor {name!r} has {end - begin} bytes but {info['dtype']}{list(shape)} needs {numel * elem}"
            )
        tensors.append(HeaderTensor(name, info["dtype"], shape, end - begin))
    return tensors


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: shard(s) listed in {INDEX_FILE} are missing: {missing}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    return files


def component_of(name: str) -> str:
    """Which plan component a checkpoint tensor belongs to (by its name, either Gemma 4 prefix)."""
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


def _format_of(tensors: list[HeaderTensor]) -> str:
    packed = any(t.dtype == "U8" for t in tensors)
    float_matrices = [t.dtype for t in tensors if t.dtype in FLOAT_DTYPES and len(t.shape) >= 2]
    if packed:
        return "mixed" if float_matrices else "nvfp4"
    dtypes = float_matrices or [t.dtype for t in tensors]
    return max(set(dtypes), key=dtypes.count).lower()


def weights_from_checkpoint(folder: str | Path) -> WeightBreakdown:
    """Bytes per component as stored in the checkpoint's safetensors files (vision/audio towers included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    by_component: dict[str, list[HeaderTensor]] = {}
    for file in checkpoint_files(folder):
        for tensor in read_safetensors_header(file):
            by_component.setdefault(component_of(tensor.name), []).append(tensor)
    order = [c for c in COMPONENTS if c in by_component]
    nbytes = {c: sum(t.nbytes for t in by_component[c]) for c in order}
    params = {c: sum(_logical_params(t) for t in by_component[c]) for c in order}
    formats = {c: _format_of(by_component[c]) for c in order}
    return WeightBreakdown("as stored", "checkpoint headers", nbytes, params, formats)


SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")


def _logical_params(tensor: HeaderTensor) -> int:
    """Weights a tensor holds: a packed uint8 byte is two FP4 values; quantization scales count for none."""
    if tensor.name.rsplit(".", 1)[-1] in SCALE_SUFFIXES:
        return 0
    numel = 1
    for d in tensor.shape:
        numel *= d
    return 2 * numel if tensor.dtype == "U8" else numel
