"""Candidate launch configurations that `nvfp4kit bench kernels --tune` times for each shape and M.

The lists are short on purpose: each distinct configuration is a separate Triton compile. Every candidate
uses only generic (SM80+) features; `decode="asm"` is PTX that also runs on SM80+.
"""

from __future__ import annotations

import dataclasses
import time

from nvfp4kit.kernels.configs import LinearConfig, MoEConfig, config_to_dict, heuristic_moe_config
from nvfp4kit.kernels.path_limits import FRAG_MAX_TOKENS, MOE_FRAG_MAX_TOKENS
from nvfp4kit.tuning.timing import time_graph

ERROR_BOUND = 1e-2  # relative L2 error vs fp32 math on the dequantized weights (bf16 output rounding ~1e-3)

# (block_n, block_k, num_warps, num_stages) for the small-M tensor-core path (block_m = 16)
SMALL_M_TILES = (
    (32, 256, 4, 3),
    (64, 256, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (32, 128, 2, 4),
    (16, 256, 2, 3),
)
# (block_n, block_k, num_warps) of small-M tiles with the nibble halves: the fewest sm_90 main-loop instructions a
# weight (4.3-4.5 against 5.8 for the default 16-column tile; scripts/cpu_sass_counts.py), fewer programs
SMALL_M_HALVES_TILES = ((64, 256, 4), (32, 256, 2))
# (block_n, block_k, num_warps, num_stages, swap_ab, halves) for 16 < M <= 128 (block_m 32 or 64), each with split-K
# up to ~8 waves. Session 23 (H100, `scripts/gpu_linear_tune_check.sh`): of six more tiles tried (shallower
# pipelines, 256-wide K, the nibble halves) only the last one here won anywhere (the dense down at 64 / 128 tokens,
# 15.6 -> 14.4 us), and a deeper split the local o projection at 32 tokens (split 8: 12.9 -> 11.2 us); the others
# only lengthened `tune`
MID_M_TILES = (
    (64, 128, 4, 4, False, False),
    (128, 64, 4, 4, False, False),
    (128, 128, 8, 4, False, False),
    (64, 128, 4, 4, True, False),
    (128, 128, 4, 4, True, False),
    (64, 256, 4, 3, False, True),
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


def _deep_splits(tiles: int, k: int, block_k: int, sms: int) -> list[int]:
    """Split-K factors for one-token tensor-core tiles: up to ~8 programs an SM (several waves), two K tiles a
    split at least. `scripts/gpu_gemv_split_probe.py` (H100, session 15): the 64-column tile split 4 ways took the
    global q/k projection from 16.0 to 14.0 us and split 8 ways the global o projection from 14.3 to 13.0 us,
    where `_splits` stops at one or two waves."""
    out = [1]
    while tiles * out[-1] * 2 <= 8 * sms and k // (block_k * out[-1] * 2) >= 2:
        out.append(out[-1] * 2)
    return out


def linear_candidates(
    m: int, n: int, k: int, *, sms: int, decodes=("asm",), frag: bool = False
) -> list[LinearConfig]:
    """Configs to time for an [M, K] x [N, K]^T linear; `frag`: also the fragment GEMV (SM80+, up to 16 tokens)."""
    out: list[LinearConfig] = []
    if frag and m <= FRAG_MAX_TOKENS and k % 32 == 0:
        for k_warps in (1, 2, 4, 8):
            for unroll in (1, 2, 4):
                out.append(LinearConfig("frag", 8, 8, 256, 1, num_warps=k_warps, decode="asm", unroll=unroll))
    for decode in decodes:
        if m <= 2:
            # narrow rows x wide K: few, long loads in flight per program (won at M=1 on the H100 for o/down)
            # 4 rows x 1024: the fastest local o projection on the H100 (8.4 vs 9.1 us, session 15)
            for bn, bk, warps, stages in (
                (32, 256, 4, 3), (8, 1024, 4, 2), (8, 1024, 4, 3), (8, 1024, 8, 3), (4, 1024, 4, 2),
            ):  # fmt: skip
                for split in _splits(-(-n // bn), k, bk, sms):
                    out.append(
                        LinearConfig(
                            "gemv", m, bn, bk, split, num_warps=warps, num_stages=stages, decode=decode
                        )
                    )
            # nibble halves (no interleave of the decoded weights): the fastest H200 down projection, 4 rows x
            # 512 (6.52 vs 6.85 us tuned; scripts/gpu_gemv_split_probe.py --family halves, session 16)
            for bn, bk in ((4, 512), (8, 1024)):
                out.append(
                    LinearConfig("gemv", m, bn, bk, 1, num_warps=4, num_stages=2, decode=decode, halves=True)
                )
        if m <= 16:
            splits = _deep_splits if m <= 2 else _splits
            for bn, bk, warps, stages in SMALL_M_TILES:
                for split in splits(-(-n // bn), k, bk, sms):
                    out.append(
                        LinearConfig(
                            "dot", 16, bn, bk, split, num_warps=warps, num_stages=stages, decode=decode
                        )
                    )
            for bn, bk, warps in SMALL_M_HALVES_TILES:
                for split in _splits(-(-n // bn), k, bk, sms):
                    out.append(
                        LinearConfig("dot", 16, bn, bk, split, num_warps=warps, decode=decode, halves=True)
                    )
        elif m <= 128:
            # above 64 tokens also one 128-row block: each weight tile decoded once, not once per 64 rows
            for bm in (32,) if m <= 32 else (64,) if m <= 64 else (64, 128):
                for bn, bk, warps, stages, swap, halves in MID_M_TILES:
                    tiles = -(-m // bm) * -(-n // bn)
                    for split in _deep_splits(tiles, k, bk, sms):
                        out.append(
                            LinearConfig(
                                "dot", bm, bn, bk, split, swap, num_warps=warps, num_stages=stages, decode=decode,
                                halves=halves,
                            )
                        )  # fmt: skip
        else:
            for bm, bn, bk, warps, stages, swap in LARGE_M_TILES:
                out.append(LinearConfig("dot", bm, bn, bk, 1, swap, 8, warps, stages, decode))
    return out


# split mode (few tokens): (block_n, block_k, warps) of gate_up and of down
SPLIT_GATE_UP_TILES = ((32, 256, 4), (64, 256, 4), (32, 128, 4))  # (16, *) ran 2x slower on the H200
# (block_n, block_k, warps, K split) of down; the split gives each slot's 704-wide K to several programs
SPLIT_DOWN_TILES = ((64, 128, 4, 1), (128, 128, 4, 1), (64, 64, 4, 1), (64, 128, 4, 2), (64, 64, 4, 3))


# pipeline depths of the split kernels: Nsight Compute on the H200 (session 6) found the batch-1 gate_up kernel
# limited to 4 blocks an SM by shared memory and registers alike (25% theoretical occupancy, DRAM 17%): two
# stages hold less shared memory, so more programs fit an SM to hide the weight loads' latency. With (3, True):
# the nibble halves at three stages (no register copies of the activation operand, 17% fewer sm_90 instructions)
SPLIT_VARIANTS = ((3, False), (2, False), (3, True))  # (num_stages, halves)


def _split_mode(tokens, top_k, hidden, inter, sms, decode) -> list[MoEConfig]:
    out = []
    for stages, halves in SPLIT_VARIANTS:
        for gu_bn, gu_bk, gu_warps in SPLIT_GATE_UP_TILES:
            tiles = tokens * top_k * -(-inter // gu_bn)
            fill = _splits(tiles, hidden, gu_bk, 2 * sms)
            for split in sorted({*fill, 2 * fill[-1]}):
                for dn_bn, dn_bk, dn_warps, dn_split in SPLIT_DOWN_TILES:
                    gate_up = dict(gate_up_block_n=gu_bn, gate_up_block_k=gu_bk, gate_up_warps=gu_warps)
                    down = dict(
                        down_block_n=dn_bn, down_block_k=dn_bk, down_warps=dn_warps, down_split_k=dn_split
                    )
                    out.append(
                        MoEConfig(
                            split=True,
                            gate_up_split_k=split,
                            decode=decode,
                            num_stages=stages,
                            halves=halves,
                            **gate_up,
                            **down,
                        )
                    )
    return out


def moe_candidates(
    tokens: int,
    num_experts: int,
    top_k: int,
    *,
    decodes=("asm",),
    hidden: int = 2816,
    inter: int = 704,
    sms: int = 132,
    frag: bool = False,
) -> list[MoEConfig]:
    """Configs to time for the MoE layer at `tokens`; `frag`: also the fragment kernels (SM80+ bf16; per pair up
    to 8 tokens, expert-grouped up to 128), so that the table records which path wins on this card."""
    out: list[MoEConfig] = []
    per_expert = tokens * top_k / num_experts
    for decode in decodes:
        if tokens <= 16:
            out.extend(_split_mode(tokens, top_k, hidden, inter, sms, decode))
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
                    aligns = (
                        ("experts", "triton", "torch") if bm == block_ms[0] and gu_bn == 32 else ("experts",)
                    )
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
        # what an untuned card runs is always a candidate, so a tuned entry is never slower than no entry
        heuristic = dataclasses.replace(
            heuristic_moe_config(tokens, num_experts, top_k, hidden=hidden, inter=inter, sms=sms),
            decode=decode,
        )
        if heuristic not in out:
            out.append(heuristic)
    if tokens <= 128:  # the nibble halves: 4-5% faster at 16-64 tokens on the H200, 3% slower at 706
        out += [dataclasses.replace(c, halves=True) for c in out if not c.split]
    # without the fragment kernels no path is named: the token limits keep choosing
    if not frag:
        return out
    # the fragment paths first (the defaults at these sizes: timed before a --budget-s runs out); each tiles
    # candidate names its path, so that a table entry is an explicit choice over the token limits
    first = [MoEConfig(path="frag")] if tokens <= MOE_FRAG_MAX_TOKENS else []
    if 2 <= tokens <= 128:  # H100: 1.05-1.16x the tiles at 8-32 tokens, 0.96x at 64, 0.70x at 128
        first.append(MoEConfig(path="grouped"))
    return first + [dataclasses.replace(c, path="tiles") for c in out]


class Budget:
    """Wall-clock budget for the tuning sweep: once spent, remaining shapes use the default configuration."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline


def tune_case(case, candidates, *, sets: int, calls: int, budget: Budget, log) -> tuple[object, float, int]:
    """(fastest config, its us, candidates timed): each candidate checked against the reference first."""
    best, best_us, tried = None, float("inf"), 0
    for cfg in candidates:
        if not budget.left():
            break
        try:
            if not case.runs(cfg):  # e.g. a fragment path these operands do not take
                log(f"    skip {cfg}: its kernels do not take this case")
                continue
            err = case.error(cfg)
            if err > ERROR_BOUND:
                log(f"    reject {cfg}: error {err:.2e}")
                continue
            us = time_graph(case.call(cfg), sets=sets, calls=calls, repeats=7)
        except Exception as exc:  # a candidate that fails to compile or launch is skipped, loudly
            log(f"    fail {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        tried += 1
        log(f"    {us:8.1f} us  {short(cfg)}")
        if us < best_us:
            best, best_us = cfg, us
    return best, best_us, tried


def short(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in config_to_dict(cfg).items())
