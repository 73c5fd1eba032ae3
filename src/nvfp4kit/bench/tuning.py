"""Candidate launch configurations that `nvfp4kit bench kernels --tune` times for each shape and M.

The lists are short on purpose: each distinct configuration is a separate Triton compile. Every candidate
uses only generic (SM80+) features; `decode="asm"` is PTX that also runs on SM80+.
"""

from __future__ import annotations

from nvfp4kit.kernels.configs import LinearConfig, MoEConfig

# (block_n, block_k, num_warps, num_stages) for the small-M tensor-core path (block_m = 16)
SMALL_M_TILES = (
    (32, 256, 4, 3),
    (64, 256, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (32, 128, 2, 4),
    (16, 256, 2, 3),
)
# (block_n, block_k, num_warps, swap_ab) for 16 < M <= 128 (block_m 32 or 64)
MID_M_TILES = (
    (64, 128, 4, False),
    (128, 64, 4, False),
    (128, 128, 8, False),
    (64, 128, 4, True),
    (128, 128, 4, True),
)
# (block_m, block_n, block_k, num_warps, num_stages, swap_ab) for large M
LARGE_M_TILES = (
    (128, 128, 64, 8, 3, False),
    (128, 256, 64, 8, 3, False),
    (256, 128, 64, 8, 3, False),
    (64, 128, 64, 4, 4, False),
    (128, 128, 64, 8, 3, True),
)


def _splits(tiles: int, k: int, block_k: int, sms: int) -> list[int]:
    """Split-K factors worth trying: enough programs for ~1-2 waves, at least two K tiles per split."""
    best = 1
    while tiles * best * 2 <= 2 * sms and k // (block_k * best * 2) >= 2:
        best *= 2
    return sorted({best, max(1, best // 2)})


def linear_candidates(m: int, n: int, k: int, *, sms: int, decodes=("asm",)) -> list[LinearConfig]:
    out: list[LinearConfig] = []
    for decode in decodes:
        if m <= 2:
            # narrow rows x wide K: few, long loads in flight per program (won at M=1 on the H100 for o/down)
            for bn, bk, warps, stages in ((32, 256, 4, 3), (8, 1024, 4, 2), (8, 1024, 4, 3), (8, 1024, 8, 3)):
                for split in _splits(-(-n // bn), k, bk, sms):
                    out.append(
                        LinearConfig(
                            "gemv", m, bn, bk, split, num_warps=warps, num_stages=stages, decode=decode
                        )
                    )
        if m <= 16:
            for bn, bk, warps, stages in SMALL_M_TILES:
                for split in _splits(-(-n // bn), k, bk, sms):
                    out.append(
                        LinearConfig(
                            "dot", 16, bn, bk, split, num_warps=warps, num_stages=stages, decode=decode
                        )
                    )
        elif m <= 128:
            bm = 32 if m <= 32 else 64
            for bn, bk, warps, swap in MID_M_TILES:
                tiles = -(-m // bm) * -(-n // bn)
                for split in _splits(tiles, k, bk, sms):
                    out.append(
                        LinearConfig(
                            "dot", bm, bn, bk, split, swap, num_warps=warps, num_stages=4, decode=decode
                        )
                    )
        else:
            for bm, bn, bk, warps, stages, swap in LARGE_M_TILES:
                out.append(LinearConfig("dot", bm, bn, bk, 1, swap, 8, warps, stages, decode))
    return out


def moe_candidates(tokens: int, num_experts: int, top_k: int, *, decodes=("asm",)) -> list[MoEConfig]:
    out: list[MoEConfig] = []
    per_expert = tokens * top_k / num_experts
    for decode in decodes:
        if tokens <= 8:
            for gu_bn, gu_bk, dn_bn, dn_bk, mode in (
                (32, 128, 64, 64, "pair"),
                (32, 256, 64, 128, "pair"),
                (32, 128, 128, 64, "pair"),
                (32, 256, 32, 128, "token"),
            ):
                out.append(
                    MoEConfig(
                        sorted=False,
                        gate_up_block_n=gu_bn,
                        gate_up_block_k=gu_bk,
                        down_block_n=dn_bn,
                        down_block_k=dn_bk,
                        down_mode=mode,
                        decode=decode,
                    )
                )
        if tokens >= 2:
            block_ms = [16] if per_expert <= 8 else ([16, 32] if per_expert <= 32 else [64, 128])
            for bm in block_ms:
                warps = 4 if bm <= 32 else 8
                for gu_bn, gu_bk, dn_bn, dn_bk in ((32, 128, 64, 64), (64, 128, 128, 64), (128, 64, 128, 64)):
                    aligns = ("triton", "torch") if bm == block_ms[0] and gu_bn == 32 else ("triton",)
                    for align in aligns:
                        out.append(
                            MoEConfig(
                                block_m=bm,
                                gate_up_block_n=gu_bn,
                                gate_up_block_k=gu_bk,
                                down_block_n=dn_bn,
                                down_block_k=dn_bk,
                                gate_up_warps=warps,
                                down_warps=warps,
                                align=align,
                                decode=decode,
                            )
                        )
    return out
