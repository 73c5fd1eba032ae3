"""How the decode and prefill attention kernels are launched: tile sizes a card gets, resident blocks an SM, key
splits a decode step takes. Plain Python (no Triton), so the engine's warm-up plan and the cross-compiling checks
share the kernels' own choices.

Key splits are counted in waves: a decode launch is items x KV heads x splits programs, and the SMs hold
`decode_blocks_per_sm` of them each at once. The old rule (four programs an SM, 128 keys a split) left a partial
second wave at batch 64 and 112 on the H100 and gave batch 1 six splits where 24 ran 35-40% faster (session 31).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from nvfp4kit.kernels.arch_limits import limits_or_nearest
from nvfp4kit.kernels.configs import interpreting, kernel_capability, sm_count, timed_tiles_fit


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows per program (BLOCK_Q tokens x GROUP heads, padded)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # a cap a thread (Triton's `maxnreg`): resident blocks an SM follow it


# Registers a thread of a 4-warp decode tile may use: 65,536 / (3 blocks x 128 threads), rounded down to a multiple
# of 8, so three blocks fit an SM whatever the Triton version allocates. Uncapped, the global tile took 177 on sm_90
# (two blocks), and batch 96's 384 programs (2 key splits) ran in two waves of 264 where they fit one of 396: 149 ->
# 178 us a layer in session 30 (H100) while batch 112, two waves either way, went 251 -> 180. The sliding tile takes
# 167 with Triton 3.6 (the timed 144 us) and 174 with 3.9. Triton 3.6 compiles both capped tiles without spills
# (3.9: 8 / 24 B). Session 31 timed the global tile's cap: 175 -> 122 us at batch 96.
_DECODE_REGISTERS = 168

# FP8 stored-K decode tiles (sliding layers) take three pipeline stages where three such blocks still fit an SM's
# shared memory (sm_80/87/90/100; not sm_86/89/120, 100 KB): 26B-A4B's sliding layer on the H100 (session 31) went
# 146 -> 130 us at batch 96 and 191 -> 168 at 112 (Triton 3.6; 42 KB a block, 26 KB at two stages). The global
# tile's shared memory did not change with its stages (its K is derived in registers).
_DECODE_STAGES = 3


def select_config(
    head_dim: int, group: int, *, decode: bool, fp8: bool = False, capability: tuple[int, int] | None = None
) -> AttentionConfig:
    """Tile sizes by head size, mode and KV dtype: tiles that compile without register spills for sm_90 (ptxas -v)
    at head_dim 256 and 512, the fastest of those timed on H100 (docs/benchmarks.md, "Attention kernels").
    Decode at head dim 512 on other cards (`capability`, see `timed_tiles_fit`) takes 8 warps: on sm_80/86 4 warps
    spilled 400-660 B a thread with libdevice's sin/cos (since session 30, Triton 3.6: 255 registers unspilled, 8
    warps 245-248; eight resident warps an SM either way); on sm_89/120 8 warps double the resident warps (one
    block fits an SM either way). Untimed on those cards. 4-warp decode tiles cap their registers so
    three blocks fit an SM (`_DECODE_REGISTERS`), and FP8 stored-K ones take three stages where three blocks still
    fit (`_DECODE_STAGES`)."""
    min_rows = 1 if interpreting() else 16  # tensor-core dots need M >= 16
    rows = max(min_rows, next_pow2(group))
    if decode:
        wide = head_dim >= 512
        warps = (4 if timed_tiles_fit(capability) else 8) if wide else (4 if fp8 or head_dim < 256 else 8)
        cap = _DECODE_REGISTERS if warps == 4 else None
        block_n = 16 if wide else 32
        stages = 2
        if fp8 and not wide and warps == 4:
            tiles = _DECODE_STAGES * 2 * block_n * head_dim  # K and V bytes a block buffers (an upper bound)
            fit = limits_or_nearest(capability or (9, 0)).resident_blocks(
                num_warps=4, registers=cap, shared=tiles
            )
            stages = _DECODE_STAGES if fit >= 3 else 2
        return AttentionConfig(rows, block_n, num_warps=warps, num_stages=stages, max_registers=cap)
    warps = 8 if head_dim >= 256 else 4
    return AttentionConfig(max(rows, 64 if head_dim <= 256 else 32), 32, num_warps=warps, num_stages=2)


def paged_prefill_block_q(head_dim: int, group: int) -> int:
    """Query tokens per work item when the paged kernel runs a prefill (the engine's prefills take
    `prefill_attention`'s own kernel and tiles)."""
    return max(1, select_config(head_dim, group, decode=False).block_m // next_pow2(group))


def decode_blocks_per_sm(config: AttentionConfig, capability: tuple[int, int]) -> int:
    """Blocks of a decode tile one SM holds, by its threads and registers (an uncapped tile counted at 255); its
    shared memory was sized to fit as many (`select_config`)."""
    limits = limits_or_nearest(capability)
    return max(1, limits.resident_blocks(num_warps=config.num_warps, registers=config.max_registers or 255))


_MIN_SPLIT_KEYS = 32  # two 16-key tiles: batch 1 at 816 keys ran fastest at 24 splits (H100, session 31)
_MAX_SPLITS = 128  # 256 and 512 were slower at 128K keys (H100)


def choose_num_splits(
    num_items: int,
    kv_heads: int,
    max_keys: int,
    *,
    device: torch.device,
    head_dim: int,
    group: int,
    fp8: bool,
) -> int:
    """Key splits per decode item, counted in waves: the grid is items x KV heads x splits programs, and a wave is
    as many as the SMs hold at once (`decode_blocks_per_sm`). A program's time follows its share of the keys plus
    its partial result (written, then read by the merge: 8 x group bytes a head dimension against 2 x KV bytes a
    key), so the count with the least waves x that time wins; a larger count must win by 5%. At least 32 keys a
    split, at most 128 splits. On the H100 (26B-A4B, 816 keys, session 31) this picks the fastest or near-fastest
    timed count at batch 1-112 where the old rule (four programs an SM, 128 keys a split) lost up to 25%: the
    global layer at batch 64 took 87 us at 3 splits, 110 at the old 4; batch 1 runs 25 splits, not 6."""
    capability = kernel_capability(device)
    if capability is None:
        return 1
    slots = _decode_slots(capability, sm_count(device), head_dim, group, fp8)
    return wave_splits(num_items * kv_heads, slots, max_keys, group=group, fp8=fp8)


def wave_splits(programs: int, slots: int, max_keys: int, *, group: int, fp8: bool) -> int:
    """`choose_num_splits` for `programs` (items x KV heads) of a tile `slots` of which run at once."""
    limit = max(1, min(max_keys // _MIN_SPLIT_KEYS, _MAX_SPLITS))
    keys = max(max_keys, 1) // _MIN_SPLIT_KEYS * _MIN_SPLIT_KEYS or 1  # a cache key that changes every 32
    return _fewest_waves(max(1, programs), slots, limit, group * 4 / ((1 if fp8 else 2) * keys))


@functools.lru_cache(maxsize=64)
def _decode_slots(capability: tuple[int, int], sms: int, head_dim: int, group: int, fp8: bool) -> int:
    """Decode programs the card holds at once (one wave)."""
    config = select_config(head_dim, group, decode=True, fp8=fp8, capability=capability)
    return sms * decode_blocks_per_sm(config, capability)


@functools.lru_cache(maxsize=4096)
def _fewest_waves(programs: int, slots: int, limit: int, partial: float) -> int:
    """`partial`: a split's partial result over its item's KV bytes."""
    best, best_cost = 1, float(math.ceil(programs / slots))
    for splits in range(2, limit + 1):
        cost = math.ceil(programs * splits / slots) / splits * (1 + partial * splits)
        if cost < 0.95 * best_cost:
            best, best_cost = splits, cost
    return best


def merge_chunk(num_splits: int) -> int:
    """Splits the merge kernel sums at a time (its one compile-time size: 2, 4 or 8, so three variants)."""
    return min(8, next_pow2(num_splits))


def split_variant(num_splits: int) -> int:
    """What of a split count the decode kernels are compiled for: 0 (no split) or the merge's chunk."""
    return 0 if num_splits <= 1 else merge_chunk(num_splits)
