"""Decode CUDA graphs across tensor-parallel ranks.

Every rank captures the same decode graphs over its own shard and KV cache (`DecodeGraphs`), the model's
collectives (all-reduces, the logits' all-gather) captured inside them, in the same order on every rank. A
replay is announced like any step: rank 0 sends the step's sequences on the pipe and broadcasts the token ids,
then every rank refills its graph's fixed buffers from the same sequences and replays; the captured collectives
meet on the GPUs. Capturing runs in lockstep the same way (one announced call; each rank captures its sizes in
the same order). On the CPU the graphs are `eager` (the fixed buffers and padding without a graph), which is how
the tests check the protocol over gloo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from nvfp4kit.distributed.worker import seq_tuples
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
        ids = input_ids
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor(ids, dtype=torch.long, device=self.local.model.device)
        return self.group.call(
            ("graph_step", seq_tuples(seqs)), [ids], lambda: self.local.run(input_ids, seqs)
        )

    def close(self) -> None:
        """Rank 0's graphs; the workers' end with their processes."""
        self.local.close()
