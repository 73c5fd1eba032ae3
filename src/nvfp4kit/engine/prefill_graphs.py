"""CUDA graphs for steps that prefill: one captured forward per token count, replayed with fresh metadata.

A step that prefills launches every kernel of the model from Python. On the H200 (26B-A4B, 96 sequences decoding
while one 610-token prompt joins) the host needed 87-114 ms to queue such a step while its kernels took 33 ms
(`scripts/gpu_mixed_step_profile.py`, session 9): under load, every arriving prompt stalls all streams for about
six decode steps. Captured once per token count, as decode steps are (`cuda_graphs.py`), the step costs its
kernels. A step of T tokens over n sequences replays the graph of the smallest captured count >= T:

- tokens past T are padding: no KV slot (-1), position 0, a zero attention output;
- the sequence slots past n hold no tokens, and the last slot stays empty so that unused work items can point
  at it and do nothing;
- the attention work items are built on the host each step into fixed buffers: one decode item per slot
  (sequences with one token; key splits fixed at capture for the longest context, as decode graphs do) and the
  query tiles of the sequences with more, each list filled up with items of the empty slot;
- only the rows to sample reach the LM head, through a fixed index buffer.

A step the graphs cannot take runs eagerly (`fits`): more tokens or sequences than captured, a sequence with more
tokens than one sliding-window pass takes, images, prompt logprobs. On by default for every multiple of 256 tokens up to 2048 on
70+ GiB GPUs without tensor parallelism (`EngineConfig.prefill_graphs`, `--prefill-graphs`; `none` turns them
off); the memory plan reserves the graphs' own pool (`plan.pools.runtime_reserve`). On the H200
`tests/gpu/test_prefill_graphs_cuda.py` passes, and the 96-decode + 1-prompt step above took 36.6 ms replayed
against 101.8 eager in session 11 (a slower host than session 10's: 39.0 vs 48.7), one 602-token prompt alone
26.5 vs 52.1 (`scripts/gpu_mixed_step_profile.py --prefill-graphs 768 1024`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.batch_context import (
    BatchContext,
    SeqSlice,
    StepMetadata,
    per_seq_buffer,
    work_item_pairs,
)
from nvfp4kit.engine.cuda_graphs import pinned
from nvfp4kit.engine.engine_config import EngineConfig
from nvfp4kit.engine.kv_pools import KVCache
from nvfp4kit.kernels.attention_metadata import WorkItems
from nvfp4kit.model.gemma4 import Gemma4Model

log = logging.getLogger(__name__)


@dataclass
class _PrefillGraph:
    tokens: int
    graph: torch.cuda.CUDAGraph | None  # None: `forward` runs eagerly on the same buffers (CPU tests)
    forward: Callable[[], torch.Tensor]
    input_ids: torch.Tensor  # [T] int64
    per_seq: torch.Tensor  # int32 [4 S + S * max_blocks]: the per-sequence rows, then the block table
    per_token: torch.Tensor  # int64 [3, T]: positions, global slots, ring slots
    items: dict[int, torch.Tensor]  # query tokens per item (1: decode items) -> int32 [2, capacity]
    sample_rows: torch.Tensor  # int64 [S]
    logits: torch.Tensor | None  # [S, vocab] fp32, written by each replay


class PrefillGraphs:
    """Captured forwards of `model` over `cache` for steps of up to each of `token_counts` tokens."""

    def __init__(
        self,
        model: Gemma4Model,
        cache: KVCache,
        *,
        token_counts: tuple[int, ...],
        max_seqs: int,
        max_model_len: int,
        attention_backend: str | None = None,
        eager: bool = False,
    ):
        """`max_seqs`: the most sequences a step holds (one more slot stays empty). `eager`: the same buffers and
        padding run without a graph, on any device."""
        if model.device.type != "cuda" and not eager:
            raise ValueError("CUDA graphs need the model on a CUDA device (or eager=True)")
        if not token_counts or min(token_counts) < 1:
            raise ValueError(f"token counts must be positive, got {token_counts}")
        backend = select_attention_backend(model.device, attention_backend)
        if not backend.needs_metadata:
            raise ValueError(
                f"prefill graphs need an attention backend that reads the step from device buffers (triton), "
                f"not {backend.name}"
            )
        from nvfp4kit.kernels.prefill_attention import prefill_block_q  # Triton: only where graphs are used

        self.model, self.cache, self.eager = model, cache, eager
        self.backend = backend
        self.token_counts = tuple(sorted(set(token_counts)))
        self.slots = max_seqs + 1
        layout = cache.layout
        self.max_blocks = min(layout.num_blocks, -(-max_model_len // layout.block_size))
        self.max_model_len = max_model_len
        cfg = model.config
        self.block_qs = sorted(
            {1}
            | {
                prefill_block_q(v.shape[2], cfg.num_attention_heads // v.shape[1])
                for v in (cache.values[cfg.kv_source_layer(i)] for i in range(cfg.num_hidden_layers))
            }
        )
        self._graphs: dict[int, _PrefillGraph] = {}
        self._kept: list[torch.Tensor] = []  # buffers the graphs write that others may replace (`capture`)
        self._pool = None
        self._logits: torch.Tensor | None = None

    @property
    def max_tokens(self) -> int:
        return self.token_counts[-1]

    def close(self) -> None:
        for entry in self._graphs.values():
            if entry.graph is not None:
                entry.graph.reset()
        self._graphs, self._pool, self._logits, self._kept = {}, None, None, []
        self.model = self.cache = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every token count, the largest first so that the smaller ones reuse its memory pool."""
        from nvfp4kit.kernels.dequant import scratch_buffers

        if self.eager:
            self._graphs = {t: self._capture_one(t) for t in self.token_counts}
            return
        device = self.model.device
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0]
        self._pool = torch.cuda.graph_pool_handle()
        self._logits = torch.empty(
            self.slots, self.model.config.vocab_size, dtype=torch.float32, device=device
        )
        stream = torch.cuda.Stream(device)  # one side stream: cuBLAS keeps a workspace per stream
        for tokens in reversed(self.token_counts):
            self._graphs[tokens] = self._capture_one(tokens, stream)
        torch.cuda.synchronize(device)
        # the graphs hold views of the dequantized-weight scratch; an eager prefill of 4096+ tokens later swaps
        # it for a larger one (moe_prefill), so keep the captured buffers alive with the graphs
        self._kept = scratch_buffers()
        used = free_before - torch.cuda.mem_get_info(device)[0]
        log.info(
            "captured prefill CUDA graphs for %s tokens a step in %.1f s (%.0f MiB)",
            ",".join(map(str, self.token_counts)), time.perf_counter() - t0, used / 2**20,
        )  # fmt: skip

    def _capture_one(self, tokens: int, stream: torch.cuda.Stream | None = None) -> _PrefillGraph:
        device, slots = self.model.device, self.slots
        per_seq = torch.zeros(4 * slots + slots * self.max_blocks, dtype=torch.int32, device=device)
        per_seq[2 * slots : 3 * slots] = tokens  # every slot empty, its row offset past the step's rows
        per_token = torch.full((3, tokens), -1, dtype=torch.int64, device=device)
        per_token[0] = 0
        # host lists that fix the launch shapes: the decode key splits of the longest context
        metadata = StepMetadata.from_tensors(
            per_seq, per_token, [self.max_model_len - 1] * slots, [1] * slots
        )
        metadata.padded_rows = True
        items = {}
        for block_q in self.block_qs:
            capacity = slots if block_q == 1 else -(-tokens // block_q) + slots
            buf = torch.zeros(2, capacity, dtype=torch.int32, device=device)
            buf[0] = slots - 1
            items[block_q] = buf
            metadata.set_items(WorkItems(buf[0], buf[1], block_q))
        input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        sample_rows = torch.zeros(slots, dtype=torch.long, device=device)

        def forward() -> torch.Tensor:
            ctx = BatchContext(self.model, self.cache, [], device, backend=self.backend, metadata=metadata)
            hidden = self.model.hidden_states(input_ids, ctx)
            return self.model.logits(hidden.index_select(0, sample_rows))

        entry = _PrefillGraph(tokens, None, forward, input_ids, per_seq, per_token, items, sample_rows, None)
        if self.eager:
            return entry
        stream = stream or torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile every kernel and grow the lazy buffers (dequant scratch) outside
                forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        entry.logits = self._logits
        with torch.cuda.graph(entry.graph, pool=self._pool):
            entry.logits.copy_(forward())
        return entry

    def fits(self, seqs: list[SeqSlice], tokens: int) -> bool:
        """Whether a step of `seqs` (`tokens` in all, no images) can replay a graph."""
        return (
            tokens <= self.max_tokens
            and len(seqs) < self.slots
            and all(s.length <= self.cache.sliding_chunk and not s.image_spans for s in seqs)
            and all(len(s.block_table) <= self.max_blocks for s in seqs)
        )

    def run(self, input_ids: list[int], seqs: list[SeqSlice], sample_rows: list[int]) -> torch.Tensor:
        """Logits [len(sample_rows), vocab] of the step's rows `sample_rows` (as the eager step computes them)."""
        g = self.fill(input_ids, seqs, sample_rows)
        if g.graph is None:
            return g.forward()[: len(sample_rows)]
        g.graph.replay()
        return g.logits[: len(sample_rows)]

    @torch.inference_mode()
    def fill(self, input_ids: list[int], seqs: list[SeqSlice], sample_rows: list[int]) -> _PrefillGraph:
        """Write one step into the buffers of the smallest graph that holds it."""
        if not self.fits(seqs, len(input_ids)):
            raise ValueError(
                f"a step of {len(input_ids)} tokens over {len(seqs)} sequences fits no prefill graph"
            )
        tokens = next(t for t in self.token_counts if t >= len(input_ids))
        g, slots = self._graphs[tokens], self.slots
        per_seq, _, _, _ = per_seq_buffer(seqs, slots - len(seqs), self.max_blocks)
        per_seq[2 * slots + slots - 1] = tokens  # the empty slot has no row
        _, real, _, _ = StepMetadata.host_tensors(seqs, self.cache)
        per_token = torch.full((3, tokens), -1, dtype=torch.int64)
        per_token[0] = 0
        per_token[:, : real.shape[1]] = real
        ids = torch.zeros(tokens, dtype=torch.long)
        ids[: len(input_ids)] = torch.tensor(input_ids, dtype=torch.long)
        rows = torch.zeros(slots, dtype=torch.long)
        rows[: len(sample_rows)] = torch.tensor(sample_rows, dtype=torch.long)
        for block_q, buf in g.items.items():
            host = torch.zeros(buf.shape, dtype=torch.int32)
            host[0] = slots - 1
            pairs = work_item_pairs([s.length for s in seqs], block_q)
            if pairs:
                host[:, : len(pairs)] = torch.tensor(pairs, dtype=torch.int32).T
            buf.copy_(pinned(host), non_blocking=True)
        g.input_ids.copy_(pinned(ids), non_blocking=True)
        g.per_seq.copy_(pinned(per_seq), non_blocking=True)
        g.per_token.copy_(pinned(per_token), non_blocking=True)
        g.sample_rows.copy_(pinned(rows), non_blocking=True)
        return g


def prefill_graphs_for(
    model: Gemma4Model, cache: KVCache, config: EngineConfig, max_model_len: int, eager: bool = False
) -> PrefillGraphs | None:
    """The captured graphs `config.prefill_graphs` asks for (counts past the step budget dropped), or None: none
    asked for, no CUDA graphs on this device (unless `eager`), or an attention backend without device metadata."""
    counts = tuple(t for t in config.prefill_graphs or () if t <= config.max_num_batched_tokens)
    if not counts or not (eager or (config.cuda_graphs and model.device.type == "cuda")):
        return None
    if not select_attention_backend(model.device, config.attention_backend).needs_metadata:
        return None  # as for decode graphs (logged there)
    graphs = PrefillGraphs(
        model, cache, token_counts=counts, max_seqs=config.max_num_seqs, max_model_len=max_model_len,
        attention_backend=config.attention_backend, eager=eager,
    )  # fmt: skip
    graphs.capture()
    return graphs
