"""The streaming safetensors writer: readable by safetensors, aligned, sharded at the limit, indexed."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from nvfp4kit.quant.shard_writer import ShardedWriter, parse_size


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.packed": torch.randint(0, 255, (7, 3), generator=g, dtype=torch.uint8),
        "a.scale": torch.randn(7, 5, generator=g).to(torch.float8_e4m3fn),
        "a.scale_2": torch.tensor(0.25),
        "b.weight": torch.randn(9, 4, generator=g).bfloat16(),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.flag": torch.tensor([True, False]),
    }


def read_back(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_single_file_round_trip_and_alignment(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=10**6)
    writer.add_all(tensors())
    assert writer.close() == [tmp_path / "model.safetensors"]
    back = read_back(tmp_path / "model.safetensors")
    for name, t in tensors().items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(
            back[name].view(torch.uint8) if t.dim() else back[name], t.view(torch.uint8) if t.dim() else t
        )
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    for info in header.values():  # every tensor starts at a multiple of its element size
        size = {"I64": 8, "F32": 4, "BF16": 2}.get(info["dtype"], 1)
        assert info["data_offsets"][0] % size == 0
    assert not list(tmp_path.glob("*.spool*")) and not list(tmp_path.glob("*.tmp"))


def test_shards_and_index(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=64)
    for i in range(5):
        writer.add(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each: one per shard
    paths = writer.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"] == {f"t{i}": paths[i].name for i in range(5)}
    assert torch.equal(read_back(paths[3])["t3"], torch.full((10,), 3.0))


def test_refusals(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=100)
    writer.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="'x' written twice"):
        writer.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="complex64 cannot be stored"):
        writer.add("y", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no tensors were written"):
        ShardedWriter(tmp_path / "empty", max_shard_bytes=100).close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size '5 gigs'"):
        parse_size("5 gigs")
    with pytest.raises(ValueError, match="must be positive"):
        parse_size("0GB")
