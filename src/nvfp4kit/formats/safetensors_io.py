"""Reading safetensors checkpoints lazily: headers without tensor data, tensors one at a time.

A checkpoint is `model.safetensors` or shards listed in `model.safetensors.index.json`. Every header is
checked against its file's size up front, so a truncated or corrupt shard is reported by name before any
weight is loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reading headers (plan, inspect) needs no torch
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not hold the tensors the model needs."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (tensor name -> dtype/shape/offsets), validated."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (shorter than its 8-byte header length)"
                )
            (length,) = struct.unpack("<Q", raw_len)
            if length > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {length} bytes)")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file (truncated shard?)")
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        elem = DTYPE_BYTES.get(info["dtype"])
        if elem is not None and numel * elem != end - begin:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes but {info['dtype']}{list(info['shape'])} "
                f"needs {numel * elem}"
            )
    return header


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, `model.safetensors`, or any *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in {INDEX_FILE} are missing: {missing}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")


class CheckpointReader:
    """All tensors of a checkpoint folder, by name; data is read only when `get` asks for it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        for file in checkpoint_files(self.folder):
            for name, info in read_header(file).items():
                shape = tuple(info["shape"])
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                self.tensors[name] = TensorInfo(name, info["dtype"], shape, file, nbytes)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}") from None

    def handle(self, file: Path):
        """The open (memory-mapped) safetensors file, opened on first use and kept until `close`."""
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Read one tensor (memory-mapped), then move/cast it; no other tensor is touched."""
        info = self.info(name)
        handle = self.handle(info.file)
        tensor = handle.get_tensor(name)
        if device is not None or dtype is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        self._handles.clear()
