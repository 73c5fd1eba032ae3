"""Per-tile arrival counters for kernels whose programs meet in a workspace (split-K, top-k slots).

Each program parks its partial, counts itself in with an atomic, and the last to arrive reduces and resets the
counter to zero: no second launch and no host sync, so the kernels replay inside CUDA graphs.
"""

from __future__ import annotations

import torch

from nvfp4kit.model.branches import on_side_stream

_COUNTERS: dict[tuple[torch.device, bool], torch.Tensor] = {}


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for `tiles` tiles, kept per device, one set for the side stream of
    model/branches.py (its kernels run beside the main stream's and must not count into the same tiles); the
    kernels leave them at zero again."""
    cuda = device.type == "cuda"
    key = (device, cuda and on_side_stream(device))
    have = _COUNTERS.get(key)
    if have is None or have.numel() < tiles:
        have = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            _COUNTERS[key] = have  # one made during a capture belongs to that graph's memory pool
    return have
