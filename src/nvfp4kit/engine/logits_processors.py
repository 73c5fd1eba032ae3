"""Per-row changes to a batch of logits before sampling: logit_bias, min_tokens, structured-output masks,
and NaN/inf safety.

`process_logits(logits [B, V], rows)` is meant to sit just before the sampler, on the same device as the
logits, so the batched GPU sampler can call it unchanged: the work is a few indexed updates per row that
needs them, and rows that need nothing cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nvfp4kit.engine.structured_output import ConstraintState, apply_constraint_masks
from nvfp4kit.sampling import SamplingParams


@dataclass(frozen=True)
class LogitsRow:
    """What one row's processors need: its parameters, how many tokens it has generated, its stop ids."""

    params: SamplingParams
    num_output_tokens: int
    stop_ids: frozenset[int]
    constraint: ConstraintState | None = None  # structured output: the grammar's token mask

    @property
    def needs_processing(self) -> bool:
        constrained = self.constraint is not None and self.constraint.active
        return bool(self.params.logit_bias) or self.num_output_tokens < self.params.min_tokens or constrained


def process_logits(logits: torch.Tensor, rows: Sequence[LogitsRow]) -> torch.Tensor:
    """Logits with each row's bias added, its stop ids masked while below min_tokens and its grammar's forbidden
    tokens masked (structured output); values made finite.

    Returns `logits` itself when no row needs anything (the common case), else a modified copy.
    """
    todo = [i for i, row in enumerate(rows) if row.needs_processing]
    if not todo:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for i in todo:
        row = rows[i]
        if row.params.logit_bias:
            ids = [t for t, _ in row.params.logit_bias if 0 <= t < vocab]
            bias = [b for t, b in row.params.logit_bias if 0 <= t < vocab]
            if ids:
                index = torch.tensor(ids, device=logits.device)
                logits[i, index] += torch.tensor(bias, device=logits.device, dtype=logits.dtype)
        if row.num_output_tokens < row.params.min_tokens and row.stop_ids:
            stop = [t for t in row.stop_ids if 0 <= t < vocab]
            logits[i, torch.tensor(stop, device=logits.device)] = float("-inf")
    constrained = [(i, rows[i].constraint) for i in todo if rows[i].constraint is not None]
    if constrained:
        apply_constraint_masks(logits, constrained)
    # a bias of +-1e30 must not turn into inf - inf = NaN later on
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf")
    )
