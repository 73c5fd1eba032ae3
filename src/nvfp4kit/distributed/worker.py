"""A worker rank (1..N-1): load its shard, then run every model step rank 0 announces, until told to stop.

Rank 0 announces each call on a pipe (small host-side messages: the step's sequences, row counts); the
tensors follow as broadcasts inside the process group (the token ids, the hidden rows for logits), and the
model's own collectives run inside the forward. The worker keeps a KV cache of its own heads with rank 0's
layout: rank 0's scheduler hands out blocks and rings, and the same ids index every rank's pools.

Messages (tuples, first item the kind): ("cache", KVLayout, kv dtype name); ("step", seqs, attention backend
name) then a broadcast of the ids [T]; ("logits", rows) then a broadcast of hidden [rows, H];
("sequence", T) then a broadcast of the ids [T] (one whole sequence from an empty contiguous cache: eval); ("copy_ring",
source, target); ("fp8_lm_head", enabled); ("graphs", batch sizes, max_model_len, attention backend, eager): capture
decode graphs as rank 0 does; ("graph_step", batch) then broadcasts of that graph's buffers (ids, per-sequence and
per-token metadata): replay it (distributed/graphs.py); ("stop",). A worker that raises sends ("error", rank, message,
traceback) and exits, which ends rank 0's pending collective at once (its sockets close).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nvfp4kit.distributed.collectives import TorchCollectives, join_group, rank_device
from nvfp4kit.distributed.loading import load_shard
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.cuda_graphs import DecodeGraphs
from nvfp4kit.engine.kv_pools import KV_DTYPES, KVCache
from nvfp4kit.engine.prefix_cache import PrefixCache
from nvfp4kit.kernels.configs import set_cache_dir
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.plan.parallel import ParallelLayout

# (start, length, offset, block table, ring) of one sequence in a step
SeqTuple = tuple[int, int, int, list[int], int]


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to start (pickled to the spawned processes)."""

    path: Path
    layout: ParallelLayout
    port: int
    device: str  # rank 0's device; rank r runs on `rank_device(device, r)`
    dtype: torch.dtype
    backend: str | None  # op backend name
    timeout_s: float
    loader: Callable[..., Gemma4Model] = load_shard  # (path, layout, rank, dtype=, device=, backend=)
    # rank 0's folder of kernel tuning tables (`LLM(kernel_cache_dir=)` sets it there only), read here too
    kernel_cache_dir: Path | None = None


def seq_tuples(seqs: list[SeqSlice]) -> list[SeqTuple]:
    return [(s.start, s.length, s.offset, list(s.block_table), s.ring) for s in seqs]


def make_collectives(layout: ParallelLayout, rank: int) -> TorchCollectives:
    vocab = layout.vocab_range(rank)
    return TorchCollectives(
        rank=rank, world_size=layout.world, vocab_start=vocab.start, vocab_rows=len(layout.vocab_range(0))
    )


def worker_main(rank: int, spec: WorkerSpec, conn: Connection) -> None:
    """The spawned process's entry point."""
    try:
        if spec.kernel_cache_dir is not None:
            set_cache_dir(spec.kernel_cache_dir)
        device = rank_device(torch.device(spec.device), rank)
        join_group(
            rank=rank, world_size=spec.layout.world, port=spec.port, device=device, timeout_s=spec.timeout_s
        )
        model = spec.loader(
            spec.path, spec.layout, rank, dtype=spec.dtype, device=device, backend=spec.backend
        )
        model.set_parallel(make_collectives(spec.layout, rank))
        conn.send(("ready", rank))
        _serve(model, conn, device)
    except EOFError:  # rank 0 is gone: nothing to report to
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to rank 0, then the rank ends
        try:
            conn.send(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the pipe is gone too
            pass
        os._exit(1)  # no process-group teardown: the peers must see this rank go now
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


@torch.inference_mode()
def _serve(model: Gemma4Model, conn: Connection, device: torch.device) -> None:
    cache: KVCache | None = None
    rings: PrefixCache | None = None  # only its ring copy is used (the free lists are rank 0's business)
    graphs: DecodeGraphs | None = None
    hidden_size = model.config.hidden_size
    group: Any = model.parallel
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "cache":
            _, layout, kv_dtype = message
            cache = KVCache(model.config, layout, kv_dtype=kv_dtype, device=device)
            rings = PrefixCache(cache)
        elif kind == "step":
            _, seqs, attention_backend = message
            slices = [SeqSlice(*s) for s in seqs]
            ids = group.broadcast(torch.empty(sum(s.length for s in slices), dtype=torch.long, device=device))
            ctx = BatchContext(model, cache, slices, device, backend=attention_backend)
            model.hidden_states(ids, ctx)
        elif kind == "sequence":  # one whole sequence from an empty contiguous cache of this rank's heads
            ids = group.broadcast(torch.empty(message[1], dtype=torch.long, device=device))
            model.hidden_states(ids, ContiguousKVCache(model.config).step(message[1], device=device))
        elif kind == "logits":
            hidden = torch.empty(message[1], hidden_size, dtype=model.dtype, device=device)
            model.logits(group.broadcast(hidden))
        elif kind == "copy_ring":
            rings.copy_ring(message[1], message[2])
        elif kind == "fp8_lm_head":
            model.use_fp8_lm_head(message[1])
        elif kind == "graphs":
            _, sizes, max_model_len, attention_backend, eager = message
            graphs = DecodeGraphs(
                model, cache, batch_sizes=sizes, max_model_len=max_model_len,
                attention_backend=attention_backend, eager=eager,
            )  # fmt: skip
            graphs.capture()
        elif kind == "graph_step":  # rank 0's filled buffers arrive in this rank's buffers of that graph
            entry = graphs.entry(message[1])
            for buffer in (entry.input_ids, entry.per_seq, entry.per_token):
                group.broadcast(buffer)
            graphs.replay(entry)
        else:
            raise ValueError(f"unknown message {kind!r} from rank 0")


def kv_dtype_name(dtype: torch.dtype) -> str:
    """The `KV_DTYPES` name of a cache's element type (to rebuild the same cache on a worker)."""
    return next(name for name, value in KV_DTYPES.items() if value == dtype)
