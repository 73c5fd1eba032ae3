"""Streaming safetensors writer: tensors go to disk as they come, shards close at a size limit.

A safetensors file needs its header (names, dtypes, offsets) before the data, and the header is only known
once the shard is full. So each open shard spools tensor bytes to scratch files, one per alignment class
(8/4/2/1-byte elements), and at close writes header + spools into the final file. Grouping by element size
keeps every tensor naturally aligned without gaps (the format forbids holes). RAM holds no more than the
tensors the caller is handing over; disk is written twice, which costs far less than a whole shard in RAM.
Shards end up as `model.safetensors`, or `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json`, the layout transformers writes.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_COPY_CHUNK = 16 * 2**20


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units like transformers; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


class _Shard:
    def __init__(self, folder: Path, number: int):
        self.path = folder / f"shard-{number:05d}.tmp"
        self.spools = {size: (folder / f"shard-{number:05d}.spool{size}") for size in (8, 4, 2, 1)}
        self.handles = {size: path.open("wb") for size, path in self.spools.items()}
        self.entries: dict[int, list[tuple[str, str, list[int], int]]] = {size: [] for size in self.spools}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous()
        size = data.element_size()
        length = data.numel() * size
        if length:
            self.handles[size].write(data.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[size].append((name, SAFETENSORS_DTYPES[data.dtype], list(data.shape), length))
        self.nbytes += length

    def finish(self) -> list[str]:
        for handle in self.handles.values():
            handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for size in (8, 4, 2, 1):
            for name, dtype, shape, length in self.entries[size]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
                offset += length
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with self.path.open("wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for size in (8, 4, 2, 1):
                with self.spools[size].open("rb") as spool:
                    shutil.copyfileobj(spool, out, _COPY_CHUNK)
                self.spools[size].unlink()
        return [name for size in (8, 4, 2, 1) for name, *_ in self.entries[size]]


class ShardedWriter:
    """`add(name, tensor)` in any order; `close()` names the shards and writes the index."""

    def __init__(self, folder: str | Path, *, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.closed: list[tuple[Path, list[str]]] = []
        self.current: _Shard | None = None
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if (
            self.current is not None
            and self.current.nbytes
            and self.current.nbytes + nbytes > self.max_shard_bytes
        ):
            self._close_current()
        if self.current is None:
            self.current = _Shard(self.folder, len(self.closed) + 1)
        self.current.add(name, tensor)
        self.names.add(name)
        self.total_bytes += nbytes

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in sorted(tensors):
            self.add(name, tensors[name])

    def _close_current(self) -> None:
        assert self.current is not None
        self.closed.append((self.current.path, self.current.finish()))
        self.current = None

    def close(self) -> list[Path]:
        """Finish the last shard, give shards their final names, write the index when there are several."""
        if self.current is not None:
            self._close_current()
        if not self.closed:
            raise ValueError("no tensors were written")
        count = len(self.closed)
        if count == 1:
            final = self.folder / "model.safetensors"
            self.closed[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        paths = []
        for i, (path, names) in enumerate(self.closed, start=1):
            final = self.folder / f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths
