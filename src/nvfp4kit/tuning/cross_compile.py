"""Compile kernels for a card that is not here, and read what they ask of it: shared memory, registers, occupancy.

Triton compiles for any NVIDIA target without a GPU (ptxas ships with it). Inside `compile_for(capability)`
every Triton launch compiles for that target instead of running (a fake driver answers Triton's device
questions) and leaves a `Compiled` record; the launch's outputs stay unwritten. A kernel that asks a block
for more shared memory than the card allows compiles fine and fails at its first launch there: here too it
raises `OutOfResources`, so code that falls back to smaller tiles does so as it would on the card. This is how
we know, on a CPU, that the configurations a card gets launch there and how many of their programs fit an SM.
Limits per compute capability: `kernels/arch_limits.py`.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

from nvfp4kit.kernels.arch_limits import ArchLimits, arch_limits
from nvfp4kit.kernels.configs import StandIn, interpreting, set_stand_in


@dataclass(frozen=True)
class Compiled:
    """One kernel as a launch compiled it: what it asks of an SM."""

    kernel: str
    shared: int  # dynamic shared memory per block (bytes)
    num_warps: int
    num_stages: int
    registers: int | None  # per thread (from the cubin; None when cuobjdump is missing)
    spills: int | None  # local memory bytes per thread (register spills and stack)
    constants: tuple[tuple[str, object], ...]  # the launch's constexpr values, for the report

    def blocks_per_sm(self, limits: ArchLimits) -> int:
        """Resident blocks of this kernel on one SM, the least of the shared-memory, register, thread and
        block limits (0: it cannot launch)."""
        return limits.resident_blocks(num_warps=self.num_warps, registers=self.registers, shared=self.shared)

    def occupancy(self, limits: ArchLimits) -> float:
        """Resident warps over the SM's maximum."""
        return self.blocks_per_sm(limits) * self.num_warps * 32 / limits.threads_per_sm


class _TargetDriver:
    """The parts of Triton's driver that compiling asks for, answering for a card that is not present."""

    def __init__(self, capability: tuple[int, int], real) -> None:
        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        self.device = 10_000 + self.target.arch  # a device id of its own: JIT caches are per device
        self._real = real

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device=None) -> int:
        return 0

    def __getattr__(self, name):  # anything else (e.g. type mapping) from the real driver when there is one
        if self._real is None:
            raise RuntimeError(f"compiling for another card does not provide driver.{name}")
        return getattr(self._real, name)


@functools.cache
def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def cubin_resources(cubin: bytes, name: str) -> tuple[int | None, int | None]:
    """(registers per thread, local-memory bytes per thread) of kernel `name` in a cubin, read by cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    lines = text.splitlines()
    heading = next((i for i, line in enumerate(lines) if line.strip() == f"Function {name}:"), None)
    if heading is None or heading + 1 >= len(lines) or "REG:" not in lines[heading + 1]:
        return None, None
    fields = dict(part.split(":", 1) for part in lines[heading + 1].split())
    return int(fields["REG"]), int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))


_resources: dict[str, tuple[int | None, int | None]] = {}  # compiled kernel hash -> cubin_resources


@functools.cache
def _constexpr_names(fn: JITFunction) -> frozenset[str]:
    return frozenset(p.name for p in fn.params if p.is_constexpr)


def _record(fn: JITFunction, kernel, kwargs: dict) -> Compiled:
    meta = kernel.metadata
    if meta.hash not in _resources:  # cuobjdump once per compiled kernel, not per launch
        _resources[meta.hash] = cubin_resources(kernel.asm["cubin"], meta.name)
    registers, spills = _resources[meta.hash]
    names = _constexpr_names(fn)
    constants = tuple((k, v) for k, v in kwargs.items() if k in names)
    return Compiled(fn.__name__, meta.shared, meta.num_warps, meta.num_stages, registers, spills, constants)


@contextlib.contextmanager
def compile_for(
    capability: tuple[int, int], sms: int, *, zero_allocations: bool = False
) -> Iterator[list[Compiled]]:
    """Within this block every Triton launch compiles for a card of `capability` with `sms` SMs and does not run;
    CPU tensors stand for that card's (the kernels' choices of decoder, FP8 path and splits follow it). Yields the
    list the launches are recorded into. Not thread-safe: Triton's driver is switched process-wide.

    Kernel outputs are never written here; `zero_allocations` makes `torch.empty(_like)` zero-fill inside the
    block, so host code that indexes with a kernel's output (routing ids, say) stays in bounds."""
    if interpreting():
        raise RuntimeError("compile_for needs TRITON_INTERPRET unset: the interpreter compiles nothing")
    try:
        real = driver.active
    except RuntimeError:  # no GPU here: nothing to fall back on
        real = None
    records: list[Compiled] = []
    original_run = JITFunction.run

    limits = arch_limits(capability)

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append(_record(self, kernel, kwargs))
        if kernel.metadata.shared > limits.smem_per_block:  # what the launch on that card would raise
            raise OutOfResources(kernel.metadata.shared, limits.smem_per_block, "shared memory")
        return kernel

    empty, empty_like = torch.empty, torch.empty_like
    driver.set_active(_TargetDriver(capability, real))
    JITFunction.run = compile_only
    set_stand_in(StandIn(capability, sms))
    if zero_allocations:
        torch.empty, torch.empty_like = torch.zeros, torch.zeros_like
    try:
        yield records
    finally:
        torch.empty, torch.empty_like = empty, empty_like
        set_stand_in(None)
        JITFunction.run = original_run
        if real is None:
            driver._active = None  # back to "ask again": a later call on a GPU machine finds the real driver
        else:
            driver.set_active(real)
