"""Fused GELU-tanh MoE for a few tokens (decode): two launches that keep every SM busy even for one token.

At decode sizes the work is reading the routed experts' weights once; the sorted grouped GEMM of
`fused_moe.py` gives one token too few programs (one per 64 output columns). Here:
  * gate_up: one program per (token-expert pair, BLOCK_N gate/up columns, K split), so one token of
    26B-A4B already makes 8 x 22 x split programs; the K-split partials meet in an fp32 workspace and the last
    program to arrive at a tile sums them (in split order), applies GeGLU and writes the activation row;
  * down: one program per (token, BLOCK_N output columns, top-k slot, K split); each one's weighted partial row
    goes to the workspace and the last to arrive sums the top-k x split rows (in slot, then split order) into
    the output.
Sums run in a fixed order whichever program arrives last, so results are deterministic (graph replay ==
eager, bitwise). Counters are left at zero after every call: nothing syncs with the host.

Each program multiplies on the tensor cores with the token in row 0 of a 16-row MMA: the spare rows cost
nothing at these sizes, while CUDA-core products would add to the decode's integer work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.configs import MoEConfig
from nvfp4kit.kernels.geglu import geglu_sigmoid
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import (
    fold_scale,
    load_act_halves,
    load_act_tile,
    load_weight_halves,
    load_weight_tile,
    mma,
)
from nvfp4kit.kernels.split_k import arrival_counters


@triton.jit
def _row_times_weights(
    acc, x_ptr, row, w_base, s_base, rn, k0, K, stride_wn, stride_sn,
    BN: tl.constexpr, BK: tl.constexpr, NVFP4: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    HALVES: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """acc [16, BN] + x[row, k0:k0+BK] . W[rn, k0:k0+BK]^T on the tensor cores, the row in lane 0 of 16; HALVES:
    even and odd K columns apart, two MMAs, no nibble interleave (nvfp4_tile.py)."""
    lanes = tl.arange(0, 16)
    dtype = x_ptr.dtype.element_ty
    if HALVES:
        xe, xo = load_act_halves(x_ptr + row, lanes * 0, lanes == 0, k0, K, 0, BK, EVEN_K)
        we, wo = load_weight_halves(
            w_base, s_base, rn, k0, K, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
        )
        return mma(mma(acc, xe, tl.trans(we), INTERPRET), xo, tl.trans(wo), INTERPRET)
    x = load_act_tile(x_ptr + row, lanes * 0, lanes == 0, k0, K, 0, BK, EVEN_K)
    w = load_weight_tile(w_base, s_base, rn, k0, K, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype)
    return mma(acc, x, tl.trans(w), INTERPRET)


@triton.jit(do_not_specialize=["num_pairs"])  # a per-step count: no variant per batch size
def _moe_gate_up_split_kernel(
    x_ptr, w_ptr, s_ptr, s2_ptr, act_ptr, ws_ptr, counter_ptr, topk_ids_ptr,
    num_pairs, inter, hidden, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_am,
    TOP_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    NVFP4: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, HALVES: tl.constexpr, INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(topk_ids_ptr + pair).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    row = (pair // TOP_K).to(tl.int64) * stride_xm
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % inter
    acc_gate = tl.zeros([16, BN], dtype=tl.float32)
    acc_up = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, hidden, BK * SPLIT_K):
        acc_gate = _row_times_weights(
            acc_gate, x_ptr, row, w_base, s_base, rn_load, k0, hidden, stride_wn, stride_sn,
            BN, BK, NVFP4, ASM, EVEN_K, HALVES, INTERPRET,
        )  # fmt: skip
        acc_up = _row_times_weights(
            acc_up, x_ptr, row, w_base, s_base, rn_load + inter, k0, hidden, stride_wn, stride_sn,
            BN, BK, NVFP4, ASM, EVEN_K, HALVES, INTERPRET,
        )  # fmt: skip
    scale = fold_scale(s2_ptr, e, NVFP4, ASM)
    gate = tl.sum(acc_gate, axis=0) * scale  # rows other than 0 are zero
    up = tl.sum(acc_up, axis=0) * scale
    ok = rn < inter
    out_ptrs = act_ptr + pair * stride_am + rn
    if SPLIT_K == 1:
        h = geglu_sigmoid(gate, up)
        tl.store(out_ptrs, h.to(act_ptr.dtype.element_ty), mask=ok)
    else:
        # workspace [SPLIT_K, pairs, 2, inter]: this split's gate and up partials
        part = ws_ptr + (pid_k * num_pairs + pair) * 2 * inter + rn
        tl.store(part, gate, mask=ok)
        tl.store(part + inter, up, mask=ok)
        tl.debug_barrier()  # every thread's partial is issued before the arrival is counted
        tile = pair * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            gate = tl.zeros([BN], dtype=tl.float32)
            up = tl.zeros([BN], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # split order, whoever arrived last
                other = ws_ptr + (split * num_pairs + pair) * 2 * inter + rn
                gate += tl.load(other, mask=ok, other=0.0, cache_modifier=".cg")
                up += tl.load(other + inter, mask=ok, other=0.0, cache_modifier=".cg")
            h = geglu_sigmoid(gate, up)
            tl.store(out_ptrs, h.to(act_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next call (and graph replay)


@triton.jit
def _moe_down_split_kernel(
    act_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, ws_ptr, counter_ptr, topk_ids_ptr, topk_w_ptr,
    hidden, inter, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    TOP_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    NVFP4: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, HALVES: tl.constexpr, INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K
    pair = token * TOP_K + slot
    e = tl.load(topk_ids_ptr + pair).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    row = pair.to(tl.int64) * stride_am
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % hidden
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, inter, BK * SPLIT_K):
        acc = _row_times_weights(
            acc, act_ptr, row, w_base, s_base, rn_load, k0, inter, stride_wn, stride_sn,
            BN, BK, NVFP4, ASM, EVEN_K, HALVES, INTERPRET,
        )  # fmt: skip
    route = tl.load(topk_w_ptr + pair).to(tl.float32)
    y = tl.sum(acc, axis=0) * (fold_scale(s2_ptr, e, NVFP4, ASM) * route)
    ok = rn < hidden
    out_ptrs = out_ptr + token * stride_om + rn
    if TOP_K * SPLIT_K == 1:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        # workspace [tokens * TOP_K * SPLIT_K, hidden]: row (pair, split)
        tl.store(ws_ptr + (pair * SPLIT_K + pid_k) * hidden + rn, y, mask=ok)
        tl.debug_barrier()
        tile = token * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == TOP_K * SPLIT_K - 1:
            total = tl.zeros([BN], dtype=tl.float32)
            for other in tl.static_range(TOP_K * SPLIT_K):  # slot, then split order, whoever arrived last
                total += tl.load(
                    ws_ptr + (token * TOP_K * SPLIT_K + other) * hidden + rn, mask=ok, other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(counter_ptr + tile, 0)


def fused_moe_split(
    x: torch.Tensor,
    ids: torch.Tensor,
    route: torch.Tensor,
    gate_up: tuple,
    down: tuple,
    *,
    top_k: int,
    inter: int,
    config: MoEConfig,
    flags: dict,
) -> torch.Tensor:
    """x [T, H] (row stride free, unit column stride); ids/route flat [T*k]; gate_up/down as
    `fused_moe._weight_args` gives them. Returns [T, H] in x.dtype."""
    tokens, hidden = x.shape
    pairs = ids.numel()
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    gu_bn, gu_bk, split = config.gate_up_block_n, config.gate_up_block_k, config.gate_up_split_k
    split = max(1, min(split, triton.cdiv(hidden, gu_bk)))
    dn_bn, dn_bk = config.down_block_n, config.down_block_k
    dn_split = max(1, min(config.down_split_k, triton.cdiv(inter, dn_bk)))
    gu_tiles = pairs * triton.cdiv(inter, gu_bn)
    dn_tiles = tokens * triton.cdiv(hidden, dn_bn)
    counters = arrival_counters(x.device, max(gu_tiles, dn_tiles))
    ws_size = max(split * pairs * 2 * inter, dn_split * pairs * hidden)
    ws = torch.empty(ws_size, dtype=torch.float32, device=x.device)
    _moe_gate_up_split_kernel[(pairs, triton.cdiv(inter, gu_bn), split)](
        x, gate_up[0], gate_up[1], gate_up[2], act, ws, counters, ids, pairs, inter, hidden, x.stride(0),
        gate_up[3], gate_up[4], gate_up[5], gate_up[6], act.stride(0),
        TOP_K=top_k, BN=gu_bn, BK=gu_bk, SPLIT_K=split, EVEN_K=hidden % gu_bk == 0, HALVES=config.halves, **flags,
        num_warps=config.gate_up_warps, num_stages=config.num_stages, **pdl_args(x.device),
    )  # fmt: skip
    _moe_down_split_kernel[(tokens, triton.cdiv(hidden, dn_bn), top_k * dn_split)](
        act, down[0], down[1], down[2], out, ws, counters, ids, route, hidden, inter, act.stride(0),
        down[3], down[4], down[5], down[6], out.stride(0),
        TOP_K=top_k, BN=dn_bn, BK=dn_bk, SPLIT_K=dn_split, EVEN_K=inter % dn_bk == 0, HALVES=config.halves,
        **flags,
        num_warps=config.down_warps, num_stages=config.num_stages, **pdl_args(x.device),
    )  # fmt: skip
    return out
