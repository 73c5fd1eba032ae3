"""Decode CUDA graphs across tensor-parallel ranks.

Every rank captures the same decode graphs over its own shard and KV cache (`DecodeGraphs`), the model's
collectives (all-reduces, the logits' all-gather) captured inside them, in the same order on every rank. A
replay is announced like any step, with only the batch size on the pipe: rank 0 fills its graph's fixed buffers
(token ids; per-sequence metadata with the block tables; positions and slots) and broadcasts them into the
workers' buffers of the same graph, then every rank replays and the captured collectives meet on the GPUs.
Capturing runs in lockstep the same way (one announced call; each rank captures its sizes in the same order).
On the CPU the graphs are `eager` (the fixed buffers and padding without a graph), which is how the tests check
the protocol over gloo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from nvfp4kit.engine.batch_context import SeqSlice
from nvfp4kit.engine.cuda_graphs import DecodeGraphs

if TYPE_CHECKING:
    from nvfp4kit.distributed.group import TensorParallelGroup


class ParallelDecodeGraphs:
    """Rank 0's decode graphs under tensor parallel: `DecodeGraphs`' interface, every call announced to the
    workers first (their graphs: `worker.py`, messages "graphs" and "graph_step")."""

    def __init__(self, group: TensorParallelGroup, local: DecodeGraphs):
        self.group, self.local = group, local

    def __getattr__(self, name: str) -> Any:  # batch sizes, max_batch, batch_size_for, ...
        return getattr(self.local, name)

    def capture(self) -> None:
        g = self.local
        message = ("graphs", g.batch_sizes, g.max_model_len, g.attention_backend, g.eager)
        self.group.call(message, [], g.capture)

    def run(self, input_ids: list[int] | torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        # rank 0 fills its graph's buffers; the workers receive the same buffers whole (a broadcast each, no
        # per-step Python lists of block tables on the pipe) and replay the graph of that size
        g = self.local.fill(input_ids, seqs)
        buffers = [g.input_ids, g.per_seq, g.per_token]
        return self.group.call(("graph_step", g.batch), buffers, lambda: self.local.replay(g))[: len(seqs)]

    def close(self) -> None:
        """Rank 0's graphs; the workers' end with their processes."""
        self.local.close()
