"""CUDA graphs for decode steps: one captured forward per batch size, replayed with fresh metadata.

A decode step of a 26B-A4B-shaped model is thousands of small launches; launched from Python they cost ~100 ms
of CPU time while the GPU needs a few ms. Capturing the forward once per batch size (1, 2, 4, 8, 16, 24, ...)
and replaying it removes the launch cost. A step of n sequences runs the graph of the smallest captured size
>= n: the extra rows are padding sequences with no tokens (no KV writes, no attention output, see
`StepMetadata.host_tensors`), and their logits are ignored.

Everything a replay reads lives in fixed device buffers refilled before each replay: the token ids, the per-
sequence metadata (block tables padded to the longest context the engine allows) and the per-token slots. The
attention key splits are fixed at capture for the longest context; a short context leaves most splits empty,
which the merge kernel skips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice, StepMetadata
from nvfp4kit.engine.kv_pools import KVCache
from nvfp4kit.kernels.attention_metadata import WorkItems
from nvfp4kit.model.gemma4 import Gemma4Model

log = logging.getLogger(__name__)


def default_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, then every 8 up to 128, then every 16. Padding rows cost: H100, 26B-A4B, the same decode batch ran
    13.18 ms a step in a 100-row graph and 13.55 in the 112-row one (session 28; fewer than 100 of its rows were
    live, as session 29 found, so this compares graph sizes, not 100 sequences), and serving at concurrency 100
    runs 97-100 rows, which graphs every 16 put in the 112-row one."""
    sizes = [1, 2, 4] + list(range(8, 129, 8)) + list(range(144, max(max_num_seqs, 1) + 16, 16))
    capped = sorted({min(s, max_num_seqs) for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return tuple(capped)


@dataclass
class _DecodeGraph:
    batch: int
    graph: torch.cuda.CUDAGraph | None  # None: `forward` runs eagerly on the same buffers (CPU tests)
    forward: Callable[[], torch.Tensor]
    input_ids: torch.Tensor  # [B] int64
    per_seq: torch.Tensor  # int32 buffer behind `metadata.batch`
    per_token: torch.Tensor  # int64 [3, B] behind positions and slots
    logits: torch.Tensor | None  # [B, vocab] fp32, written by each replay


class DecodeGraphs:
    """Captured decode forwards of `model` over `cache`, one per batch size."""

    def __init__(
        self,
        model: Gemma4Model,
        cache: KVCache,
        *,
        batch_sizes: tuple[int, ...],
        max_model_len: int,
        attention_backend: str | None = None,
        eager: bool = False,
    ):
        """`eager`: keep the fixed buffers and padding but run the forward without a graph (any device)."""
        if model.device.type != "cuda" and not eager:
            raise ValueError("CUDA graphs need the model on a CUDA device (or eager=True)")
        self.model, self.cache, self.eager = model, cache, eager
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
        layout = cache.layout
        self.max_blocks = min(layout.num_blocks, -(-max_model_len // layout.block_size))
        self.max_model_len = max_model_len
        if not select_attention_backend(model.device, attention_backend).needs_metadata:
            # such a backend reads positions and slots from the host's lists, which a replay cannot refill
            raise ValueError(
                f"CUDA graphs need an attention backend that reads the step from device buffers (triton), "
                f"not {attention_backend or 'the default'}; run eager instead"
            )
        self.attention_backend = attention_backend
        self._graphs: dict[int, _DecodeGraph] = {}
        self._pool = None
        self._logits: torch.Tensor | None = None  # one [max batch, vocab] output shared by every graph

    def close(self) -> None:
        """Free the graphs and their private memory pool (the pool stays reserved while a graph lives)."""
        for entry in self._graphs.values():
            if entry.graph is not None:
                entry.graph.reset()
        self._graphs, self._pool, self._logits = {}, None, None
        self.model = self.cache = None

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, the largest first so the smaller ones reuse its memory pool."""
        if self.eager:
            self._graphs = {batch: self._capture_one(batch) for batch in self.batch_sizes}
            return
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.model.device)[0]
        self._pool = torch.cuda.graph_pool_handle()
        vocab = self.model.config.vocab_size
        self._logits = torch.empty(self.max_batch, vocab, dtype=torch.float32, device=self.model.device)
        # one side stream for every capture: cuBLAS keeps a workspace per stream it has run on
        stream = torch.cuda.Stream(self.model.device)
        for batch in reversed(self.batch_sizes):
            self._graphs[batch] = self._capture_one(batch, stream)
        torch.cuda.synchronize(self.model.device)
        used = free_before - torch.cuda.mem_get_info(self.model.device)[0]
        log.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s (%.0f MiB)",
            ",".join(map(str, self.batch_sizes)), time.perf_counter() - t0, used / 2**20,
        )  # fmt: skip

    def _capture_one(self, batch: int, stream: torch.cuda.Stream | None = None) -> _DecodeGraph:
        device = self.model.device
        # host lists that fix the launch shapes: one token per sequence at the longest context (key splits)
        starts, lengths = [self.max_model_len - 1] * batch, [1] * batch
        per_seq, per_token, _, _ = StepMetadata.host_tensors(
            [], self.cache, pad_to=batch, max_blocks=self.max_blocks
        )
        per_seq, per_token = per_seq.to(device), per_token.to(device)  # all padding: warm-up writes nothing
        metadata = StepMetadata.from_tensors(per_seq, per_token, starts, lengths)
        items = torch.stack([torch.arange(batch), torch.zeros(batch, dtype=torch.long)]).to(
            device, torch.int32
        )
        metadata.set_items(WorkItems(items[0], items[1], 1))
        input_ids = torch.zeros(batch, dtype=torch.long, device=device)

        def forward(out: torch.Tensor | None = None) -> torch.Tensor:
            ctx = BatchContext(
                self.model, self.cache, [], device, backend=self.attention_backend, metadata=metadata
            )
            return self.model.logits(self.model.hidden_states(input_ids, ctx), out=out)

        if self.eager:
            return _DecodeGraph(batch, None, forward, input_ids, per_seq, per_token, None)
        from nvfp4kit.kernels.launch import decode_graph_pdl  # triton: not on the CLI's import path

        stream = stream or torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        logits = self._logits[:batch]
        with decode_graph_pdl(batch):  # the launch mode the warm-up compiles for is the one captured
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile every kernel and fill lazy caches outside the capture
                    forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            with torch.cuda.graph(graph, pool=self._pool):
                forward(out=logits)  # into the buffer shared by every graph (no temporary and copy)
        return _DecodeGraph(batch, graph, forward, input_ids, per_seq, per_token, logits)

    def batch_size_for(self, num_seqs: int) -> int | None:
        """The captured size that serves `num_seqs` decode sequences (None: more than the largest)."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def run(self, input_ids: list[int] | torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        """Logits [len(seqs), vocab] of one decode step (one token per sequence, in the order given).

        `input_ids`: host ids, or a device tensor (the overlap scheduler's sampled tokens of the step before,
        copied device to device: the host never waits for them)."""
        return self.replay(self.fill(input_ids, seqs))[: len(seqs)]

    def entry(self, batch: int) -> _DecodeGraph:
        """The captured graph of `batch` (a captured size) and its fixed buffers."""
        return self._graphs[batch]

    def replay(self, g: _DecodeGraph) -> torch.Tensor:
        """Run a graph on what its buffers hold: logits [g.batch, vocab], padding rows included."""
        if g.graph is None:
            return g.forward()
        g.graph.replay()
        return g.logits

    def fill(self, input_ids: list[int] | torch.Tensor, seqs: list[SeqSlice]) -> _DecodeGraph:
        """Write one decode step (as `run` takes it) into the buffers of the smallest graph that holds it."""
        size = self.batch_size_for(len(seqs))
        if size is None:
            raise ValueError(f"{len(seqs)} sequences exceed the largest captured batch ({self.max_batch})")
        g = self._graphs[size]
        # block tables only as wide as the longest one this step: the graph's table has max_blocks columns, but
        # a sequence never reads a column past its own table, so the stale columns beyond stay unread
        per_seq, per_token, _, _ = StepMetadata.host_tensors(seqs, self.cache, pad_to=size)
        width = (per_seq.numel() - 4 * size) // size
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the graphs' {self.max_blocks}")
        if isinstance(input_ids, torch.Tensor):
            g.input_ids[: len(seqs)].copy_(input_ids)
            g.input_ids[len(seqs) :].zero_()
        else:
            ids = torch.zeros(size, dtype=torch.long)
            ids[: len(input_ids)] = torch.tensor(input_ids, dtype=torch.long)
            g.input_ids.copy_(pinned(ids), non_blocking=True)
        per_seq, per_token = pinned(per_seq), pinned(per_token)
        g.per_seq[: 4 * size].copy_(per_seq[: 4 * size], non_blocking=True)
        table = g.per_seq[4 * size :].view(size, self.max_blocks)
        table[:, :width].copy_(per_seq[4 * size :].view(size, width), non_blocking=True)
        g.per_token.copy_(per_token, non_blocking=True)
        return g


def pinned(host: torch.Tensor) -> torch.Tensor:
    """`host` in page-locked memory when CUDA is up: a non-blocking copy from pageable memory may wait for the
    stream, which would hold the host behind the decode step in flight (the overlap scheduler's case)."""
    return host.pin_memory() if torch.cuda.is_available() else host
