"""What one SM of each compute capability holds: shared memory, threads, blocks, registers.

From the CUDA C++ Programming Guide's table of technical specifications. Launch heuristics use it to size grids
in resident blocks (whole waves), and `tuning.cross_compile` to report the occupancy of kernels compiled for a card
that is not here.
"""

from __future__ import annotations

from dataclasses import dataclass

KB = 1024


@dataclass(frozen=True)
class ArchLimits:
    smem_per_block: int  # the most a block may opt into (bytes)
    smem_per_sm: int
    threads_per_sm: int
    blocks_per_sm: int
    regs_per_sm: int = 65536
    smem_reserved_per_block: int = 1 * KB  # the driver keeps 1 KB of each resident block's shared memory

    def resident_blocks(self, *, num_warps: int, registers: int | None, shared: int = 0) -> int:
        """Blocks of a kernel one SM holds: the least of its thread, block, register and shared-memory bounds
        (0: a block asks for more shared memory than it may have)."""
        if shared > self.smem_per_block:
            return 0
        bounds = [self.threads_per_sm // (32 * num_warps), self.blocks_per_sm]
        if shared:
            bounds.append(self.smem_per_sm // (shared + self.smem_reserved_per_block))
        if registers:
            per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
            bounds.append(self.regs_per_sm // (per_warp * num_warps))
        return max(0, min(bounds))


ARCH_LIMITS: dict[tuple[int, int], ArchLimits] = {
    (8, 0): ArchLimits(163 * KB, 164 * KB, 2048, 32),
    (8, 6): ArchLimits(99 * KB, 100 * KB, 1536, 16),
    (8, 7): ArchLimits(163 * KB, 164 * KB, 1536, 16),
    (8, 9): ArchLimits(99 * KB, 100 * KB, 1536, 24),
    (9, 0): ArchLimits(227 * KB, 228 * KB, 2048, 32),
    (10, 0): ArchLimits(227 * KB, 228 * KB, 2048, 32),
    (10, 3): ArchLimits(227 * KB, 228 * KB, 2048, 32),
    (12, 0): ArchLimits(99 * KB, 100 * KB, 1536, 32),
    (12, 1): ArchLimits(99 * KB, 100 * KB, 1536, 32),
}


def arch_limits(capability: tuple[int, int]) -> ArchLimits:
    if capability not in ARCH_LIMITS:
        known = ", ".join(f"{a}.{b}" for a, b in ARCH_LIMITS)
        raise ValueError(
            f"no limits known for compute capability {capability[0]}.{capability[1]} (known: {known})"
        )
    return ARCH_LIMITS[capability]


def limits_or_nearest(capability: tuple[int, int]) -> ArchLimits:
    """The limits of `capability`, else of the newest known capability below it (a card newer than this table
    runs with at least its predecessor's resources)."""
    if capability in ARCH_LIMITS:
        return ARCH_LIMITS[capability]
    older = [c for c in ARCH_LIMITS if c <= capability]
    return ARCH_LIMITS[max(older)] if older else ARCH_LIMITS[min(ARCH_LIMITS)]
