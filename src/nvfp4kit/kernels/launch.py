"""Programmatic dependent launch (PDL): a kernel may be launched while the one before it in the stream finishes.

A decode step is a chain of a few hundred short kernels, each of which pays a launch and ramp-up gap after its
predecessor ends. On Hopper and newer, a kernel launched with `launch_pdl=True` is started as soon as the
previous kernel's programs have all exited or signalled (`gdc_launch_dependents`), before that grid has fully
retired; it must not touch memory until `gdc_wait()` returns, which waits for the previous grid to complete and its
writes to be visible. Every kernel of the package calls `wait_for_inputs(PDL)` as its first statement, so the
ordering is exactly that of a plain stream (transitively: a kernel's predecessor waited for its own), and only the
launch latency overlaps. CUDA graphs keep the dependency (stream capture records a programmatic edge).

Modes (`NVFP4KIT_PDL`, read once per process; `set_pdl_mode` for experiments): 0 off (default), 1 wait first
(SM90+), 2 wait first and signal dependents right away (the next kernel's programs may then take free SM slots
while this one's last programs still run). With `NVFP4KIT_PDL` unset, decode graphs are captured with mode 1
(`decode_graph_pdl`): a decode step is a chain of short launches, and overlapping each one's launch with the tail
of the one before measured faster at every graph size but one (`PDL_DECODE_OFF_BATCHES`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nvfp4kit.kernels.configs import interpreting

# off by default for eager launches: on the H200 (26B-A4B decode, session 5) mode 2 gained 0.4% at batch 1 and lost
# 3-4% at 16/64 (the greedy tokens of modes 0 and 2 differed in one session-5 run, equal in every later one)
_DEFAULT_MODE = 0
_mode_override: int | None = None
# Decode graphs are captured with mode 1 unless NVFP4KIT_PDL says otherwise, except those of 9-16 sequences (the
# 16-sequence graph: default_batch_sizes captures 8 then 16). H100, scripts/gpu_decode_variants.py, mode 0 against
# mode 1 in one process, greedy tokens equal, tok/s. Session 25: batch 1 337.8 / 336.2 -> 354.5 (+5.2%), 2 593.9 /
# 591.6 -> 616.6 (+4.0%), 4 938.2 -> 964.1 (+2.8%), 8 1,371.0 / 1,365.1 -> 1,405.1 (+2.7%). Session 26 (two
# alternations each): 24 2,669.1 / 2,676.1 -> 2,721.7 / 2,730.2 (+2.0%), 32 3,219.7 / 3,226.0 -> 3,273.4 / 3,272.7
# (+1.6%), 48 +0.3%, 64 +0.3%, 96 6,995.9 / 7,017.9 -> 7,090.1 / 7,088.3 (+1.2%), 128 +0.9%; but the 16 graph
# loses 9-10% (batch 12: 1,694.7 -> 1,520.5; 16: 2,092.3 -> 1,875.0). Not explained: in its profile the grouped MoE
# gate_up takes 4.00 ms a step against 2.94 ms; with the dense MLP on one stream PDL gains 0.8% there (1,970.8 ->
# 1,986.9, below two streams without PDL), and launching the side stream's kernels without PDL did not help.
PDL_DECODE_OFF_BATCHES = range(9, 17)


def set_pdl_mode(mode: int | None) -> None:
    """Force a PDL mode (0, 1, 2) for every later launch; None goes back to `NVFP4KIT_PDL` / the default."""
    global _mode_override
    if mode not in (None, 0, 1, 2):
        raise ValueError(f"PDL mode must be 0, 1 or 2, got {mode!r}")
    _mode_override = mode
    _launch_args.cache_clear()


def _env_mode() -> int:
    raw = os.environ.get("NVFP4KIT_PDL", str(_DEFAULT_MODE)).strip().lower()
    if raw in ("0", "off", "false", "no"):
        return 0
    if raw in ("2", "early"):
        return 2
    if raw in ("1", "on", "true", "yes", "wait"):
        return 1
    raise ValueError(f"NVFP4KIT_PDL must be 0 (off), 1 (wait) or 2 (early), got {raw!r}")


@functools.cache
def _launch_args(device_type: str, index: int | None) -> dict:
    if device_type != "cuda" or interpreting():
        return {"PDL": 0}
    mode = _env_mode() if _mode_override is None else _mode_override
    if mode and torch.cuda.get_device_capability(index)[0] < 9:
        mode = 0  # griddepcontrol needs SM90+
    return {"PDL": mode, "launch_pdl": mode > 0}


@contextlib.contextmanager
def decode_graph_pdl(batch: int) -> Iterator[None]:
    """Around the warm-up and capture of the decode graph of `batch` sequences: PDL mode 1 outside
    `PDL_DECODE_OFF_BATCHES` when neither `NVFP4KIT_PDL` nor `set_pdl_mode` chose a mode; cards before SM90 stay
    at 0 (`pdl_args`)."""
    if batch in PDL_DECODE_OFF_BATCHES or _mode_override is not None or "NVFP4KIT_PDL" in os.environ:
        yield
        return
    set_pdl_mode(1)
    try:
        yield
    finally:
        set_pdl_mode(None)


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on `device`: the `PDL` constexpr and Triton's `launch_pdl` flag."""
    return _launch_args(device.type, device.index)


def pdl_mode(device: torch.device) -> int:
    return pdl_args(device)["PDL"]


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """First statement of every kernel: nothing is read or written before the previous kernel completes."""
    if PDL >= 1:
        gdc_wait()
    if PDL >= 2:
        gdc_launch_dependents()
