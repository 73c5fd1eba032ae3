"""Fused GELU-tanh MoE with W4A16 NVFP4 (or dense) experts.

out[t] = sum_k w[t, k] * down_e(gelu_tanh(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, k].

Three shapes of launch (chosen by `configs.select_moe_config`); the third, "split" mode for decode, lives in
`moe_split.py`:
  * small batches ("pair" mode): no sorting at all. gate_up runs one program row per (token, slot) pair and
    writes GeGLU activations [P, I]; the down projection runs one program per token that loops over its
    top-k experts, applies the routing weights and writes the summed row (two launches in all).
  * larger batches ("sorted" mode): `moe_align` groups pairs by expert in blocks of BLOCK_M rows; a grouped
    GEMM does gate_up with GeGLU in the epilogue; a second grouped GEMM does down with the routing weight
    applied and writes each pair's row; a last small kernel sums the top-k rows of each token.
Many tokens (>= `MOE_PREFILL_MIN_TOKENS`, NVFP4 experts, no explicit config, where grouped GEMMs exist) go to
`moe_prefill.py` instead: experts expanded into a BF16 scratch and cuBLAS-class grouped GEMMs.
Gate rows are [0, I) and up rows [I, 2I) of gate_up[e]; each expert has its own scale_2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import (
    MoEConfig,
    heuristic_moe,
    interpreting,
    select_moe_config,
)
from nvfp4kit.kernels.geglu import geglu_sigmoid
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.moe_align import moe_align
from nvfp4kit.kernels.moe_dispatch import moe_path
from nvfp4kit.kernels.moe_frag import fused_moe_frag
from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped
from nvfp4kit.kernels.moe_prefill import moe_prefill
from nvfp4kit.kernels.moe_split import fused_moe_split
from nvfp4kit.kernels.moe_sum import sum_top_k
from nvfp4kit.kernels.nvfp4_tile import (
    fold_scale,
    load_act_halves,
    load_act_tile,
    load_weight_halves,
    load_weight_tile,
    mma,
)
from nvfp4kit.kernels.thresholds import MOE_PREFILL_MIN_TOKENS


@triton.jit
def _block_rows(
    pair_ids_ptr, block_expert_ptr, topk_ids_ptr, num_pairs, pid_m, BM: tl.constexpr, SORTED: tl.constexpr
):
    """(expert, pair of each row, row valid, activation row) for program row-block `pid_m`."""
    lanes = tl.arange(0, BM)
    if SORTED:
        expert = tl.load(block_expert_ptr + pid_m)
        pairs = tl.load(pair_ids_ptr + pid_m * BM + lanes)
        ok = (pairs < num_pairs) & ((lanes * 0 + expert) >= 0)
        act_rows = pid_m * BM + lanes
    else:  # one pair per program: row 0 is real, the rest are masked off
        expert = tl.load(topk_ids_ptr + pid_m).to(tl.int32)
        pairs = pid_m + lanes * 0
        ok = lanes == 0
        act_rows = pairs
    return expert, pairs, ok, act_rows


@triton.jit(do_not_specialize=["num_pairs"])  # a per-step count: no variant per batch size
def _moe_gate_up_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    act_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    topk_ids_ptr,
    num_pairs,
    inter,
    hidden,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_am,
    TOP_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SORTED: tl.constexpr,
    NVFP4: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    HALVES: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, pairs, ok, act_rows = _block_rows(
        pair_ids_ptr, block_expert_ptr, topk_ids_ptr, num_pairs, pid_m, BM, SORTED
    )
    tokens = tl.where(ok, pairs // TOP_K, 0)
    e = tl.maximum(expert, 0).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % inter
    dtype = x_ptr.dtype.element_ty
    acc_gate = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(expert >= 0, hidden, 0)  # unused blocks skip the loop
    for k0 in range(0, k_end, BK):
        if HALVES:  # even and odd K columns apart: two MMAs each, no nibble interleave (nvfp4_tile.py)
            xe, xo = load_act_halves(x_ptr, tokens, ok, k0, hidden, stride_xm, BK, EVEN_K)
            ge, go = load_weight_halves(
                w_base, s_base, rn_load, k0, hidden, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
            )
            ue, uo = load_weight_halves(
                w_base, s_base, rn_load + inter, k0, hidden, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K,
                dtype,
            )  # fmt: skip
            acc_gate = mma(mma(acc_gate, xe, tl.trans(ge), INTERPRET), xo, tl.trans(go), INTERPRET)
            acc_up = mma(mma(acc_up, xe, tl.trans(ue), INTERPRET), xo, tl.trans(uo), INTERPRET)
        else:
            x = load_act_tile(x_ptr, tokens, ok, k0, hidden, stride_xm, BK, EVEN_K)
            wg = load_weight_tile(
                w_base, s_base, rn_load, k0, hidden, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
            )
            wu = load_weight_tile(
                w_base, s_base, rn_load + inter, k0, hidden, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K,
                dtype,
            )  # fmt: skip
            acc_gate = mma(acc_gate, x, tl.trans(wg), INTERPRET)
            acc_up = mma(acc_up, x, tl.trans(wu), INTERPRET)
    scale = fold_scale(s2_ptr, e, NVFP4, ASM)
    gate = acc_gate * scale
    up = acc_up * scale
    h = geglu_sigmoid(gate, up)
    mask = ok[:, None] & (rn[None, :] < inter)
    tl.store(act_ptr + act_rows[:, None] * stride_am + rn[None, :], h.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(
    act_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    num_pairs,
    hidden,
    inter,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SORTED: tl.constexpr,
    NVFP4: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    HALVES: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    """Each pair's weighted down-projection row -> out[pair] (summed over top-k by `moe_sum.sum_top_k`)."""
    wait_for_inputs(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, pairs, ok, act_rows = _block_rows(
        pair_ids_ptr, block_expert_ptr, topk_ids_ptr, num_pairs, pid_m, BM, SORTED
    )
    e = tl.maximum(expert, 0).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % hidden
    dtype = act_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(expert >= 0, inter, 0)
    for k0 in range(0, k_end, BK):
        if HALVES:
            ae, ao = load_act_halves(act_ptr, act_rows, ok, k0, inter, stride_am, BK, EVEN_K)
            we, wo = load_weight_halves(
                w_base, s_base, rn_load, k0, inter, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
            )
            acc = mma(mma(acc, ae, tl.trans(we), INTERPRET), ao, tl.trans(wo), INTERPRET)
        else:
            a = load_act_tile(act_ptr, act_rows, ok, k0, inter, stride_am, BK, EVEN_K)
            w = load_weight_tile(
                w_base, s_base, rn_load, k0, inter, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
            )
            acc = mma(acc, a, tl.trans(w), INTERPRET)
    route = tl.load(topk_w_ptr + pairs, mask=ok, other=0.0).to(tl.float32)
    y = acc * fold_scale(s2_ptr, e, NVFP4, ASM) * route[:, None]
    mask = ok[:, None] & (rn[None, :] < hidden)
    tl.store(out_ptr + pairs[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_down_token_kernel(
    act_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    hidden,
    inter,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    TOP_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NVFP4: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token per program: loop over its top-k experts, weight and sum in registers, write the row."""
    wait_for_inputs(PDL)
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    lanes = tl.arange(0, BM)
    ok = lanes == 0
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % hidden
    dtype = act_ptr.dtype.element_ty
    total = tl.zeros([BM, BN], dtype=tl.float32)
    for slot in range(TOP_K):
        pair = token * TOP_K + slot
        e = tl.load(topk_ids_ptr + pair).to(tl.int64)
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, inter, BK):
            a = load_act_tile(act_ptr, pair + lanes * 0, ok, k0, inter, stride_am, BK, EVEN_K)
            w = load_weight_tile(
                w_base, s_base, rn_load, k0, inter, stride_wn, stride_sn, BN, BK, NVFP4, ASM, EVEN_K, dtype
            )
            acc = mma(acc, a, tl.trans(w), INTERPRET)
        route = tl.load(topk_w_ptr + pair).to(tl.float32)
        total += acc * (fold_scale(s2_ptr, e, NVFP4, ASM) * route)
    y = tl.sum(total, axis=0)  # rows other than 0 are zero
    tl.store(out_ptr + token * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=rn < hidden)


def _weight_args(weight: torch.Tensor | NVFP4Tensor, name: str) -> tuple:
    """(values, scales, scale_2, stride_e, stride_n, stride_se, stride_sn, is_nvfp4) for a stacked weight."""
    if isinstance(weight, NVFP4Tensor):
        if weight.packed.dim() != 3 or weight.scale_2.numel() != weight.packed.shape[0]:
            raise ValueError(f"{name}: expected NVFP4 [E, N, K] with scale_2 [E], got {weight.shape}")
        packed, scale, s2 = weight.kernel_operands()
        return packed, scale, s2, packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), True
    if weight.dim() != 3:
        raise ValueError(f"{name}: expected a stacked [E, N, K] weight, got shape {tuple(weight.shape)}")
    return weight, weight, weight, weight.stride(0), weight.stride(1), 0, 0, False


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor | NVFP4Tensor,
    down: torch.Tensor | NVFP4Tensor,
    *,
    config: MoEConfig | None = None,
    prefill_min_tokens: int = MOE_PREFILL_MIN_TOKENS,
) -> torch.Tensor:
    """x [T, H], topk_ids/topk_weights [T, k], gate_up [E, 2I, H], down [E, H, I] -> [T, H] in x.dtype.

    Without a `config`, T >= `prefill_min_tokens` takes the grouped-GEMM path of `moe_prefill` where it runs."""
    num_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if tuple(down.shape) != (num_experts, hidden, inter) or two_inter % 2:
        raise ValueError(
            f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not match [E,2I,H]/[E,H,I]"
        )
    if x.shape[-1] != hidden:
        raise ValueError(f"activation has {x.shape[-1]} features, experts expect {hidden}")
    if isinstance(gate_up, NVFP4Tensor) != isinstance(down, NVFP4Tensor):
        raise ValueError("gate_up and down must both be NVFP4 or both dense")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    top_k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1).contiguous()
    route = topk_weights.reshape(-1).contiguous()
    if ids.numel() != tokens * top_k or route.numel() != ids.numel():
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} vs {tokens} tokens"
        )
    path = moe_path(x2, top_k, gate_up, down, prefill_min_tokens, config)
    if path == "frag":
        return fused_moe_frag(x2, ids, route, gate_up, down, top_k=top_k).reshape(*lead, hidden)
    if path == "grouped":
        return fused_moe_grouped(x2, topk_ids, topk_weights, gate_up, down).reshape(*lead, hidden)
    if path == "prefill":
        return moe_prefill(x2, ids, route, gate_up, down, top_k=top_k).reshape(*lead, hidden)
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out.reshape(*lead, hidden)
    cfg = config or select_moe_config(tokens, num_experts, top_k, hidden, inter, device=x.device)
    if cfg.path not in (None, "tiles"):  # a fragment entry whose kernels cannot take these operands
        cfg = heuristic_moe(tokens, num_experts, top_k, hidden, inter, device=x.device)
    interpret = interpreting()
    gu = _weight_args(gate_up, "gate_up")
    dn = _weight_args(down, "down")
    nvfp4 = gu[-1]
    asm = 0  # the decoder: 0 bits, 1 PTX, 2 PTX with normal block scales in both weights (nvfp4_tile.py)
    if (
        cfg.decode == "asm" and nvfp4 and not interpret and x.dtype != torch.float16
    ):  # PTX output is bf16-scaled
        asm = 2 if gate_up.normal_scales() and down.normal_scales() else 1
    flags = dict(NVFP4=nvfp4, ASM=asm, INTERPRET=interpret)
    if cfg.split:
        out = fused_moe_split(x2, ids, route, gu, dn, top_k=top_k, inter=inter, config=cfg, flags=flags)
        return out.reshape(*lead, hidden)
    pairs = ids.numel()
    gu_bn, gu_bk = cfg.gate_up_block_n, cfg.gate_up_block_k
    dn_bn, dn_bk = cfg.down_block_n, cfg.down_block_k
    if cfg.sorted:
        pair_ids, block_expert = moe_align(
            ids, num_experts=num_experts, block_m=cfg.block_m, method=cfg.align
        )
        row_blocks = block_expert.numel()
        act = torch.empty((row_blocks * cfg.block_m, inter), dtype=x.dtype, device=x.device)
    else:
        pair_ids = block_expert = ids  # unused in pair mode
        row_blocks = pairs
        act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    bm = cfg.block_m if cfg.sorted else 16
    _moe_gate_up_kernel[(row_blocks, triton.cdiv(inter, gu_bn))](
        x2, gu[0], gu[1], gu[2], act, pair_ids, block_expert, ids, pairs, inter, hidden, x2.stride(0),
        gu[3], gu[4], gu[5], gu[6], act.stride(0),
        TOP_K=top_k, BM=bm, BN=gu_bn, BK=gu_bk, SORTED=cfg.sorted, EVEN_K=hidden % gu_bk == 0, HALVES=cfg.halves,
        **flags,
        num_warps=cfg.gate_up_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )  # fmt: skip
    if not cfg.sorted and cfg.down_mode == "token":
        _moe_down_token_kernel[(tokens, triton.cdiv(hidden, dn_bn))](
            act, dn[0], dn[1], dn[2], out, ids, route, hidden, inter, act.stride(0),
            dn[3], dn[4], dn[5], dn[6], out.stride(0),
            TOP_K=top_k, BM=16, BN=dn_bn, BK=dn_bk, EVEN_K=inter % dn_bk == 0, **flags,
            num_warps=cfg.down_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
        )  # fmt: skip
        return out.reshape(*lead, hidden)
    per_pair = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    _moe_down_kernel[(row_blocks, triton.cdiv(hidden, dn_bn))](
        act, dn[0], dn[1], dn[2], per_pair, pair_ids, block_expert, ids, route, pairs, hidden, inter,
        act.stride(0), dn[3], dn[4], dn[5], dn[6], per_pair.stride(0),
        BM=bm, BN=dn_bn, BK=dn_bk, SORTED=cfg.sorted, EVEN_K=inter % dn_bk == 0, HALVES=cfg.halves, **flags,
        num_warps=cfg.down_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )  # fmt: skip
    return sum_top_k(per_pair, out, top_k).reshape(*lead, hidden)
