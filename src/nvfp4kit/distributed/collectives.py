"""The model's collectives (`model.ops.Collectives`) over torch.distributed, and joining the group.

gloo on the CPU, NCCL on CUDA. Every process group gets a timeout, so a peer that stops answering ends a
collective with an error instead of a hang (a peer that exits is noticed at once by gloo: its sockets close).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # start-up included: every rank loads its shard before the first collective


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:(index + r) for a CUDA device (one GPU a rank), the CPU for every rank on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def join_group(
    *, rank: int, world_size: int, port: int, device: torch.device, timeout_s: float, is_master: bool = False
) -> dist.TCPStore:
    """Join the default process group through the TCP store on 127.0.0.1:`port`; returns the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        "127.0.0.1", port, world_size, is_master=is_master, wait_for_workers=False, timeout=timeout
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    return store


def master_store(*, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free port the system picks (`store.port`); the workers connect to it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)


class TorchCollectives:
    """`Collectives` of the default process group: sums with all_reduce, vocab shards with all_gather."""

    def __init__(self, *, rank: int, world_size: int, vocab_start: int, vocab_rows: int):
        self.rank, self.world_size = rank, world_size
        self.vocab_start = vocab_start
        self.vocab_rows = vocab_rows  # rows of the fullest shard: every rank sends that many (padded)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        pad = self.vocab_rows - logits.shape[-1]
        local = torch.nn.functional.pad(logits, (0, pad)) if pad else logits.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place; `x` must be contiguous)."""
        dist.broadcast(x, src=0)
        return x
