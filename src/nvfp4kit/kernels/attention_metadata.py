"""What the paged-attention kernel reads about a step besides the tensors themselves (no Triton needed).

The engine builds these once per step (`engine/batch_context.py: StepMetadata`) and passes them to
`paged_attention`; they live beside the kernel so that the kernel never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionBatch:
    """Per-sequence metadata of one step, as int32 device tensors (rows may be padding with seq_len 0)."""

    seq_start: torch.Tensor  # [S] position of the first query token this step
    seq_len: torch.Tensor  # [S] query tokens this step
    seq_offset: torch.Tensor  # [S] row of the first query token in q / out
    block_table: torch.Tensor  # [S, max_blocks] global-pool blocks (padding: any valid block id)
    ring: torch.Tensor  # [S] sliding ring id


@dataclass(frozen=True)
class WorkItems:
    """Query tiles: item i covers tokens q0[i] .. q0[i] + block_q - 1 of sequence seq[i] (int32 device tensors)."""

    seq: torch.Tensor
    q0: torch.Tensor
    block_q: int

    def __len__(self) -> int:
        return self.seq.shape[0]
