"""Weight bytes of a checkpoint folder by component, read from safetensors headers only (no tensor data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nvfp4kit.formats.components import COMPONENTS, component_of, component_sizes
from nvfp4kit.formats.safetensors_io import CheckpointReader, TensorInfo
from nvfp4kit.plan.weights import BF16_BYTES, LINEAR_COPY_COMPONENTS, WeightBreakdown

FLOAT_DTYPES = ("BF16", "F16", "F32")


def _format_of(tensors: list[TensorInfo]) -> str:
    """nvfp4 (packed weights only), mixed (packed and float matrices), or the main float dtype."""
    matrices = [t.dtype for t in tensors if t.dtype in FLOAT_DTYPES and len(t.shape) >= 2]
    if any(t.dtype == "U8" for t in tensors):
        return "mixed" if matrices else "nvfp4"
    dtypes = matrices or [t.dtype for t in tensors]
    return Counter(dtypes).most_common(1)[0][0].lower()


def weights_from_checkpoint(folder: str | Path) -> WeightBreakdown:
    """Bytes per component as stored in the checkpoint's safetensors files (vision/audio towers included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    tensors = list(CheckpointReader(folder).tensors.values())
    sizes = component_sizes(tensors)
    order = [c for c in COMPONENTS if c in sizes.bytes]
    formats = {c: _format_of([t for t in tensors if component_of(t.name) == c]) for c in order}
    nbytes = {c: sizes.bytes[c] for c in order}
    params = {c: sizes.params[c] for c in order}
    return WeightBreakdown("as stored", "checkpoint headers", nbytes, params, formats)


def linear_copy_bytes_from_checkpoint(folder: str | Path) -> int:
    """Bytes of `--linear-copies` for a checkpoint, from its headers: each packed NVFP4 weight (two values a
    byte) of the copied components becomes 2 bytes a value."""
    total = 0
    for info in CheckpointReader(folder).tensors.values():
        if info.dtype == "U8" and info.name.endswith(".weight"):  # ModelOpt's packed FP4 pairs
            if component_of(info.name) in LINEAR_COPY_COMPONENTS:
                total += info.nbytes * 2 * BF16_BYTES
    return total
