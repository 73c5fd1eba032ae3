"""Per-tile arrival counters for kernels whose programs meet in a workspace (split-K, top-k slots).

Each program parks its partial, counts itself in with an atomic, and the last to arrive reduces and resets the
counter to zero: no second launch and no host sync, so the kernels replay inside CUDA graphs.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for `tiles` tiles, kept per device and stream (kernels on two streams at once,
    model/branches.py, must not count into the same tiles); the kernels leave them at zero again."""
    cuda = device.type == "cuda"
    key = (device, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    have = _COUNTERS.get(key)
    if have is None or have.numel() < tiles:
        have = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            _COUNTERS[key] = have  # one made during a capture belongs to that graph's memory pool
    return have
