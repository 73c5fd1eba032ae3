"""Where the engine thread's time goes: steps and their wall seconds by kind, exported in `/metrics`.

A server's output rate is the decode step rate times the rows per step, less the steps that do something else.
Counting the steps of each kind and the wall time `Engine.step` spent on them tells a load test's gap apart:
decode steps replayed from a CUDA graph, decode steps run eagerly (a batch larger than the largest graph), and
steps with prefill chunks (possibly with decode rows beside them), run eagerly or, with `--prefill-graphs`,
replayed from a graph. With the overlap scheduler a decode step's wall time includes reading the previous step's
tokens, so it follows the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STEP_KINDS = ("decode_graph", "decode_eager", "prefill", "prefill_graph")


@dataclass
class StepStats:
    """Steps and wall seconds per kind since the engine started (only the engine thread writes them)."""

    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0.0))

    def add(self, kind: str, seconds: float) -> None:
        self.steps[kind] += 1
        self.seconds[kind] += seconds

    def snapshot(self) -> tuple[tuple[str, int, float], ...]:
        """(kind, steps, seconds) for each kind, a value the serving thread can read while steps go on."""
        return tuple((kind, self.steps[kind], self.seconds[kind]) for kind in STEP_KINDS)
