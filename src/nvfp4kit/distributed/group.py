"""Rank 0's side of a tensor-parallel group: the worker processes, their watchdog, and the model facade.

`TensorParallelGroup.start(path, N, ...)` checks that the model splits over N ranks (before any process
starts), starts ranks 1..N-1 (torch.multiprocessing: spawn on CUDA, forkserver on the CPU), joins the process group as rank 0 through a
TCP store on a free port, and loads rank 0's shard while the workers load theirs. `group.model` is what the
`Engine` runs: a `TensorParallelModel`, whose `hidden_states` and `logits` first announce the call to every
worker (see worker.py), then run rank 0's shard; the collectives inside the forward join the ranks' parts.
Only rank 0 samples: the vocab-parallel logits are gathered to every rank, and rank 0's are the ones used.

Failure: a worker that raises reports its rank and exception and exits; rank 0's pending collective then
fails at once, and the group ends every rank and raises `TensorParallelError` naming the rank and the
exception. A watchdog thread notices a worker that died without a word (killed) between steps, and every
process-group collective has a timeout, so nothing waits for ever. `close()` stops and joins the workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nvfp4kit.config import load_config
from nvfp4kit.distributed.collectives import DEFAULT_TIMEOUT_S, join_group, master_store, rank_device
from nvfp4kit.distributed.loading import is_quantized, load_shard
from nvfp4kit.distributed.worker import WorkerSpec, kv_dtype_name, make_collectives, seq_tuples, worker_main
from nvfp4kit.kernels.configs import cache_dir
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.plan.parallel import ParallelLayout

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
ERROR_WAIT_S = 5.0  # how long a failed collective waits for the failing worker's own report


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed; the whole group has ended."""


@dataclass
class _Worker:
    rank: int
    process: Any  # a spawned multiprocessing.Process
    conn: Connection


class TensorParallelModel:
    """Rank 0's model, as the `Engine` sees it: the local shard's attributes (config, device, layers, ...),
    and forwards that run on every rank."""

    def __init__(self, model: Gemma4Model, group: TensorParallelGroup):
        self._model, self._group = model, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        ctx: Any,
        *,
        embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if embed_override is not None or any(s.image_spans for s in ctx.seqs):
            raise NotImplementedError("images are not served with tensor_parallel_size > 1 yet")
        message = ("step", seq_tuples(ctx.seqs), ctx.backend.name)
        return self._group.call(message, [input_ids], lambda: self._model.hidden_states(input_ids, ctx))

    def __call__(
        self,
        input_ids: torch.Tensor,
        ctx: Any,
        *,
        logits_at: torch.Tensor | None = None,
        embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`Gemma4Model.forward` over an engine step (a `BatchContext`) or over one whole sequence from an
        empty `ContiguousKVCache` (eval scores windows that way; every rank makes its own empty cache)."""
        if hasattr(ctx, "seqs"):
            hidden = self.hidden_states(input_ids, ctx, embed_override=embed_override)
        elif embed_override is None and getattr(getattr(ctx, "cache", None), "length", None) == 0:
            local = lambda: self._model.hidden_states(input_ids, ctx)  # noqa: E731
            hidden = self._group.call(("sequence", input_ids.shape[0]), [input_ids], local)
        else:
            raise NotImplementedError(
                "tensor parallel runs engine steps, or one sequence from an empty ContiguousKVCache"
            )
        return self.logits(hidden if logits_at is None else hidden[logits_at])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        return self._group.call(("logits", hidden.shape[0]), [hidden], lambda: self._model.logits(hidden))

    def decode_graphs(self, cache: Any, **options: Any) -> Any:
        """Decode graphs that every rank captures and replays together (`Engine.capture_decode_graphs`)."""
        from nvfp4kit.distributed.graphs import ParallelDecodeGraphs
        from nvfp4kit.engine.cuda_graphs import DecodeGraphs

        return ParallelDecodeGraphs(self._group, DecodeGraphs(self._model, cache, **options))

    def use_fp8_lm_head(self, enabled: bool = True) -> None:
        self._group.call(("fp8_lm_head", enabled), [], lambda: self._model.use_fp8_lm_head(enabled))


class TensorParallelGroup:
    def __init__(self, layout: ParallelLayout, device: torch.device, timeout_s: float):
        self.layout, self.device, self.timeout_s = layout, device, timeout_s
        self.workers: list[_Worker] = []
        self.model: TensorParallelModel | None = None
        self.failure: TensorParallelError | None = None
        self._closing = threading.Event()
        self._reports = threading.Lock()  # the caller and the watchdog both read the workers' pipes
        self._reported: TensorParallelError | None = None  # the first error a worker reported itself
        self._watchdog: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        path: str | Path,
        world_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        loader: Callable[..., Gemma4Model] = load_shard,
        quantized: bool | None = None,
        moe: str = "experts",
    ) -> TensorParallelGroup:
        """Start ranks 1..N-1, join them as rank 0 and load every shard; raises `ShardingError` at once when
        the model does not split over `world_size` ranks. `loader(path, layout, rank, dtype=, device=,
        backend=)` makes one rank's shard (default: read from the checkpoint; random weights for benchmarks;
        tests wrap it); `quantized`: whether its linears are NVFP4 (default: the checkpoint's format); `moe`:
        "experts" (expert parallel) or "tensor" (every expert split by width), see plan/parallel.py."""
        path = Path(path)
        nvfp4 = is_quantized(path) if quantized is None else quantized
        layout = ParallelLayout(load_config(path), world_size, moe).check(nvfp4=nvfp4)
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialised in this process")
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + world_size:
            raise RuntimeError(
                f"tensor_parallel_size={world_size} needs {world_size} GPUs from {device}; "
                f"{torch.cuda.device_count()} visible"
            )
        group = cls(layout, device, timeout_s)
        store = master_store(world_size=world_size, timeout_s=timeout_s)
        # every rank reads the kernel tuning tables rank 0 reads
        spec = WorkerSpec(
            path, layout, store.port, str(device), dtype, backend, timeout_s, loader, cache_dir()
        )
        if device.type == "cuda":  # a fresh interpreter: no CUDA state inherited
            context = mp.get_context("spawn")
        else:  # forked from a server that imported the worker once: no torch import per rank
            context = mp.get_context("forkserver")
            context.set_forkserver_preload(["nvfp4kit.distributed.worker"])
        try:
            for rank in range(1, world_size):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=worker_main, args=(rank, spec, theirs), name=f"nvfp4kit-tp{rank}", daemon=True
                )
                process.start()
                theirs.close()
                group.workers.append(_Worker(rank, process, ours))
            local_device = rank_device(device, 0)
            group._store = join_group(
                rank=0, world_size=world_size, port=store.port, device=local_device, timeout_s=timeout_s
            )
            model = loader(path, layout, 0, dtype=dtype, device=local_device, backend=backend)
            model.set_parallel(make_collectives(layout, 0))
            group._wait_ready()
        except TensorParallelError:
            group.close()
            raise
        except BaseException as exc:
            failure = group._worker_failure(wait_s=0.5)
            group.close()
            if failure is not None:
                raise failure from exc
            raise
        group.model = TensorParallelModel(model, group)
        group._watchdog = threading.Thread(target=group._watch, name="nvfp4kit-tp-watchdog", daemon=True)
        group._watchdog.start()
        log.info("tensor parallel: %d ranks on %s", world_size, device)
        return group

    # ---- rank 0's calls ------------------------------------------------------------------------------
    def call(self, message: tuple, tensors: list[torch.Tensor], local: Callable[[], Any]) -> Any:
        """Announce `message` to every worker, broadcast `tensors` from rank 0, then run `local` (rank 0's
        part of the same call). A failure on any rank ends the group and raises `TensorParallelError`."""
        if self.failure is not None:
            raise TensorParallelError(f"the tensor-parallel group has ended: {self.failure}")
        try:
            for worker in self.workers:
                worker.conn.send(message)
            for tensor in tensors:
                dist.broadcast(tensor.contiguous(), src=0)
            return local()
        except Exception as exc:
            failure = self._worker_failure(wait_s=ERROR_WAIT_S) or TensorParallelError(
                f"rank 0 failed: {type(exc).__name__}: {exc}"
            )
            self._end(failure)
            raise failure from exc

    def attach(self, engine: Any) -> None:
        """Give every worker a KV cache laid out as rank 0's engine's, and mirror the prefix cache's ring
        copies (the only KV data rank 0 moves outside a forward)."""
        cache = engine.cache
        self.call(("cache", cache.layout, kv_dtype_name(cache.kv_dtype)), [], lambda: None)
        prefix = getattr(engine.scheduler, "prefix", None)
        if prefix is not None:
            copy_local = prefix.copy_ring

            def copy_ring(source: int, target: int) -> None:
                self.call(("copy_ring", source, target), [], lambda: copy_local(source, target))

            prefix.copy_ring = copy_ring

    # ---- failures and shutdown -----------------------------------------------------------------------
    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        waiting = {w.rank: w for w in self.workers}
        while waiting:
            for rank, worker in list(waiting.items()):
                if worker.conn.poll(0.05):
                    message = worker.conn.recv()
                    if message[0] != "ready":
                        raise _error_from(message)
                    del waiting[rank]
                elif not worker.process.is_alive():
                    raise self._worker_failure(wait_s=0.5) or _died(worker)
            if time.monotonic() > deadline:
                raise TensorParallelError(
                    f"ranks {sorted(waiting)} did not load within {self.timeout_s:.0f} s"
                )

    def _worker_failure(self, *, wait_s: float) -> TensorParallelError | None:
        """The first worker's own error report (waiting up to `wait_s` for it), else one that has died."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._reports:  # whichever thread reads the report keeps it for the other
                for worker in self.workers:
                    if self._reported is not None:
                        break
                    try:
                        if worker.conn.poll(0):
                            message = worker.conn.recv()
                            if message[0] == "error":
                                self._reported = _error_from(message)
                    except (EOFError, OSError):
                        pass
                if self._reported is not None:
                    return self._reported
            dead = [
                w for w in self.workers if not w.process.is_alive() and w.process.exitcode not in (0, None)
            ]
            if time.monotonic() > deadline:
                return _died(dead[0]) if dead else None
            time.sleep(0.02)

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_INTERVAL_S):
            for worker in list(self.workers):
                if worker.process.is_alive() or self.failure is not None or self._closing.is_set():
                    continue  # (a worker that ends while the group closes has been told to)
                failure = self._worker_failure(wait_s=0.5) or _died(worker)
                log.error("tensor parallel: %s", failure)
                self.failure = failure
                if self.device.type == "cuda":  # NCCL would wait out its timeout: abort the pending call
                    _abort_nccl()
                return

    def _end(self, failure: TensorParallelError) -> None:
        self.failure = self.failure or failure
        self.close()

    def close(self) -> None:
        """Stop the workers (politely, then by force) and leave the process group; safe to call twice."""
        if self._closing.is_set() and not self.workers:
            return
        self._closing.set()
        for worker in self.workers:
            try:
                worker.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for worker in self.workers:
            worker.process.join(timeout=10 if self.failure is None else 1)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self.workers = []
        if dist.is_initialized():
            if self.failure is not None and self.device.type == "cuda":
                _abort_nccl()  # a collective may still wait on the lost rank: destroying would wait with it
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly; it is gone either way
                log.debug("tensor parallel: process group teardown failed", exc_info=True)
        self._store = None
        self.model = None


def _abort_nccl() -> None:
    """Abort the NCCL communicators (pending collectives fail at once); best effort: the timeout is the net."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.is_initialized():
            abort()
    except Exception:  # noqa: BLE001
        log.debug("tensor parallel: NCCL abort failed", exc_info=True)


def _error_from(message: tuple) -> TensorParallelError:
    _, rank, text, trace = message
    log.error("tensor parallel rank %d failed:\n%s", rank, trace)
    return TensorParallelError(f"rank {rank} failed: {text}")


def _died(worker: _Worker) -> TensorParallelError:
    code = worker.process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    return TensorParallelError(f"rank {worker.rank} {how} without reporting an error")


def sequential_loader(world_size: int, **options: Any) -> Callable[..., TensorParallelModel]:
    """`load(path, dtype=, device=)` for code that loads models one after another (eval's low-memory path):
    each load first ends the group of the model loaded before it (one process group at a time);
    `load.close()` ends the last one."""
    groups: list[TensorParallelGroup] = []

    def close() -> None:
        while groups:
            groups.pop().close()

    def load(
        path: str | Path, *, dtype: Any = None, device: str | torch.device = "cpu"
    ) -> TensorParallelModel:
        from nvfp4kit.model.loader import resolve_dtype

        close()
        device = torch.device(device)
        groups.append(
            TensorParallelGroup.start(
                path, world_size, dtype=resolve_dtype(dtype, device), device=device, **options
            )
        )
        return groups[-1].model

    load.close = close
    return load
