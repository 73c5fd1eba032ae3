"""Where the engine thread's time goes: steps, their wall seconds and their device seconds by kind (`/metrics`).

A server's output rate is the decode step rate times the rows per step, less the steps that do something else.
Counting the steps of each kind and the wall time `Engine.step` spent on them tells a load test's gap apart:
decode steps replayed from a CUDA graph, decode steps run eagerly (a batch larger than the largest graph), and
steps with prefill chunks (possibly with decode rows beside them), run eagerly or, with `--prefill-graphs`,
replayed from a graph. With the overlap scheduler a decode step's wall time includes reading the previous step's
tokens, so it follows the device. On CUDA each decode step's device time (events around its forward and
sampling) is summed too: a wall time well above it is the GPU waiting for the host (scheduling, the server's
threads holding the GIL), not a slow kernel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

STEP_KINDS = ("decode_graph", "decode_eager", "prefill", "prefill_graph")


@dataclass
class StepStats:
    """Steps, wall seconds and device seconds per kind since the engine started (only the engine thread writes
    them; device seconds only for the steps a `StepTimer` timed)."""

    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0.0))
    device_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
    device_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0.0))

    def add(self, kind: str, seconds: float) -> None:
        self.steps[kind] += 1
        self.seconds[kind] += seconds

    def add_device(self, kind: str, seconds: float) -> None:
        self.device_steps[kind] += 1
        self.device_seconds[kind] += seconds

    def snapshot(self) -> tuple[tuple[str, int, float, float], ...]:
        """(kind, steps, wall seconds, device seconds) for each kind, a value the serving thread can read while
        steps go on."""
        return tuple(
            (kind, self.steps[kind], self.seconds[kind], self.device_seconds[kind]) for kind in STEP_KINDS
        )


class StepTimer:
    """CUDA events around each decode step's device work (forward and sampling). `drain` hands back the steps
    the device has finished, without waiting for the others: the engine adds them to its `StepStats` after every
    step, so serving pays two event records a step and never a sync. Records nothing off CUDA."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self._pending: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._start: torch.cuda.Event | None = None

    def start(self) -> None:
        if self.enabled:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self, kind: str) -> None:
        if self.enabled and self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((kind, self._start, end))
            self._start = None

    def drain(self, wait: bool = False) -> list[tuple[str, float]]:
        """(kind, device seconds) of the timed steps the device has finished, oldest first (`wait`: all)."""
        done = []
        while self._pending and (wait or self._pending[0][2].query()):
            kind, start, end = self._pending.popleft()
            end.synchronize()
            done.append((kind, start.elapsed_time(end) / 1e3))
        return done
