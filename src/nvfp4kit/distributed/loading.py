"""Loading one rank's shard of a checkpoint: only that rank's bytes are read from the safetensors files.

`ShardedReader` is a `CheckpointReader` whose `get` reads the rank's part of a tensor (the
`ParallelLayout.tensor_slice` rule: rows or columns of a linear, packed NVFP4 bytes and block scales alike,
experts, vocab rows) through safetensors' `get_slice`, so other ranks' parts are never read. The checkpoint
formats (`formats/`) are used unchanged on top of it; per-expert checkpoints (ModelOpt) read only the rank's
experts. The model is built from `ParallelLayout.local_config()` and filled by the single-process loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nvfp4kit.formats.modelopt import EXPERT_PROJECTIONS, expert_module, stack_expert_weights
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.formats.weight_source import Weight, WeightSource, concat_out, select_source_class
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.loader import check_all_consumed, fill_model, resolve_dtype
from nvfp4kit.model.ops import OpBackend, select_backend
from nvfp4kit.plan.parallel import ParallelLayout


class ShardedReader(CheckpointReader):
    """The tensors of a checkpoint folder as rank `rank` of `layout` holds them; counts the bytes it read."""

    def __init__(self, folder: str | Path, layout: ParallelLayout, rank: int):
        super().__init__(folder)
        self.layout, self.rank = layout, rank
        self.prefix = layout.cfg.weight_prefix
        self.bytes_read = 0

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        info = self.info(name)
        handle = self.handle(info.file)
        part = self.layout.tensor_slice(name.removeprefix(self.prefix), info.shape, self.rank)
        if part is None:
            tensor = handle.get_tensor(name)
        else:
            lead, whole = (slice(None),) * part.dim, handle.get_slice(name)
            tensor = whole[lead + (slice(part.start, part.stop),)]
            if part.also is not None:  # the up half of a fused gate_up, after the gate half
                tensor = torch.cat([tensor, whole[lead + (slice(*part.also),)]], dim=part.dim)
        self.bytes_read += tensor.numel() * tensor.element_size()
        if device is not None or dtype is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor


class ExpertShard:
    """Mixed in before a format's `WeightSource`: the stacked experts are this rank's `expert_range` only."""

    expert_range: range

    def experts(self, name: str) -> tuple[Weight, Weight]:
        if self.has(f"{name}.gate_up_proj"):  # transformers' fused layout: the reader cuts the expert dim
            return super().experts(name)
        gate_up, down = [], []
        for e in self.expert_range:  # one tensor set per expert (ModelOpt): read this rank's experts only
            gate, up, dn = (self.linear(expert_module(name, e, p)) for p in EXPERT_PROJECTIONS)
            names = [self.key(expert_module(name, e, p)) for p in EXPERT_PROJECTIONS[:2]]
            gate_up.append(concat_out([gate, up], names=names))
            down.append(dn)
        return stack_expert_weights(gate_up, self.key(name)), stack_expert_weights(down, self.key(name))


def source_class(folder: str | Path) -> type[WeightSource]:
    """The checkpoint's format (as the single-process loader picks it)."""
    folder = Path(folder)
    return select_source_class(folder, json.loads((folder / "config.json").read_text()))


def is_quantized(folder: str | Path) -> bool:
    return source_class(folder) is not WeightSource


def load_shard(
    path: str | Path,
    layout: ParallelLayout,
    rank: int,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | OpBackend | None = None,
) -> Gemma4Model:
    """Rank `rank`'s model: its heads, MLP columns, experts and vocab rows, read from `path` strictly (a tensor
    that neither this rank nor another reads is an error, as in `load_model`)."""
    folder = Path(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    ops = backend if backend is not None and not isinstance(backend, str) else select_backend(device, backend)
    reader = ShardedReader(folder, layout, rank)
    base = source_class(folder)
    experts = layout.expert_range(rank)
    sharded = type(f"Sharded{base.__name__}", (ExpertShard, base), {"expert_range": experts})
    source = sharded(reader, layout.cfg, dtype=dtype, device=device)
    model = Gemma4Model(layout.local_config(), backend=ops)
    if layout.cfg.enable_moe_block:
        for layer in model.layers:
            layer.experts.keep_only(experts.start, len(experts))
    fill_model(model, source, vocab_rows=len(layout.vocab_range(rank)))
    # other ranks' per-expert tensors are theirs to read; anything else left over is unexpected
    others = re.compile(rf"{re.escape(reader.prefix)}layers\.\d+\.experts\.(\d+)\.")
    source.consumed.update(
        n for n in reader.names() if (m := others.match(n)) is not None and int(m.group(1)) not in experts
    )
    check_all_consumed(source)
    model.bytes_read = reader.bytes_read
    reader.close()
    return model.to(device)
