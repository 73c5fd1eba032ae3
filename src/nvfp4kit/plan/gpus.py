"""GPUs people serve on: memory, bandwidth, compute capability, native FP4 or not.

Memory is the total `nvidia-smi` reports (MiB), bandwidth the vendor datasheet figure (decimal GB/s).
On cards without FP4 tensor cores (everything before compute capability 10.0) NVFP4 runs as W4A16:
weights are expanded to BF16 inside the GEMM, so only their bytes shrink, not the math.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4kit.plan.units import GB, GiB, MiB

# Memory in use on a card before weights load (CUDA context, allocator, display). 0.77 GiB is what the seed
# card's own numbers imply on its RTX 3090: (17.81 GiB weights + 3.33 GiB KV) / 0.91 = 23.23 GiB free of 24 GiB.
# `plan` assumes it; the engine counts up to this much of what is in use at start as its own CUDA context.
DEFAULT_PRELOAD_USED = int(0.77 * GiB)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    compute_capability: tuple[int, int]
    native_fp4: bool
    aliases: tuple[str, ...] = ()
    sms: int = 0  # streaming multiprocessors (what kernel grids are sized against)

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


def _gpu(
    name: str, mib: int, gb_per_s: float, cc: tuple[int, int], fp4: bool, sms: int, *aliases: str
) -> GpuSpec:
    return GpuSpec(name, mib * MiB, gb_per_s * GB, cc, fp4, aliases, sms)


GPUS: tuple[GpuSpec, ...] = (
    _gpu("RTX 3090", 24576, 936, (8, 6), False, 82, "3090", "rtx3090"),
    _gpu("RTX 4090", 24564, 1008, (8, 9), False, 128, "4090", "rtx4090"),
    _gpu("RTX 5090", 32607, 1792, (12, 0), True, 170, "5090", "rtx5090"),
    _gpu("A100 40GB", 40960, 1555, (8, 0), False, 108, "a100-40", "a100-40gb", "a100_40gb"),
    _gpu("A100 80GB", 81920, 2039, (8, 0), False, 108, "a100", "a100-80", "a100-80gb", "a100_80gb"),
    _gpu("L4", 23034, 300, (8, 9), False, 58),
    _gpu("L40S", 46068, 864, (8, 9), False, 142),
    _gpu("H100 80GB", 81559, 3350, (9, 0), False, 132, "h100", "h100-80gb", "h100-sxm", "h100_80gb"),
    _gpu("H200", 143771, 4800, (9, 0), False, 132, "h200-141gb"),
    _gpu("B200", 183359, 8000, (10, 0), True, 148, "b200-180gb"),
)


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def find_gpu(name: str) -> GpuSpec:
    """Look a card up by name or alias, ignoring case, spaces and dashes ('rtx 3090', 'RTX3090', 'h100')."""
    wanted = _key(name)
    for gpu in GPUS:
        if wanted in {_key(gpu.name), *(_key(a) for a in gpu.aliases)}:
            return gpu
    known = ", ".join(g.name for g in GPUS)
    raise ValueError(f"unknown GPU {name!r}; known: {known} (or pass --gpu-memory instead)")
