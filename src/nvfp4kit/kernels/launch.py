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
while this one's last programs still run).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nvfp4kit.kernels.configs import interpreting

# off by default: on the H200 (26B-A4B decode, session 5) mode 2 gained 0.4% at batch 1 and lost 3-4% at 16/64,
# and the greedy tokens of modes 0 and 2 differed in one run (not yet explained): opt in to experiment
_DEFAULT_MODE = 0
_mode_override: int | None = None


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
