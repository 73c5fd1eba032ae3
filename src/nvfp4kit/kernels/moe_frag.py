"""Fused GELU-tanh MoE for 1-8 tokens with the fragment GEMV of `gemv_mma.py` (SM80+, bf16, GPU only).

Two launches, each program 8 weight rows of one expert (the MMA's B columns) against one activation row:
  * gate_up: one program per (token-expert pair, 4 intermediate columns): its 8 B rows are gate row j and up row j
    for 4 consecutive j, so the lane that ends with C columns 2t, 2t + 1 holds gate and up of the same column and
    applies GeGLU in registers. It writes act[pair, j] = gelu(gate) * up * routing weight * down's scale_2 (and
    the decoder's 2**62), in bf16, so that the down projection can add every expert into one accumulator;
  * down: one program per (token, 8 output rows), one warp per top-k slot over that slot's expert (704 K), the
    warps' sums added at the end: the token's output row, no workspace and no second pass.
Warps of gate_up split K (2816) as in `gemv_mma`. Rows of the MMA other than the pair's token repeat it.
`frag_gate_up_geglu` runs the same gate_up kernel for a dense MLP (one "expert", no routing) with A row g holding
token g, so that one program serves every token and the weight is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.geglu import geglu_sigmoid
from nvfp4kit.kernels.gemv_mma import (
    MOE_MAX_TOKENS,
    aligned4,
    fragment_layout_ok,
    k_loop,
    lane_ids,
    lane_sums,
    zero_acc,
)
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import fold_scale


@triton.jit
def _moe_frag_gate_up_kernel(
    x_ptr,  # [T, H] as int32 bf16 pairs
    w_ptr,  # [E, 2I, H/8] int32 words
    s_ptr,  # [E, 2I, H/16] E4M3 bytes
    s2_ptr,  # gate_up's scale_2 [E]
    down_s2_ptr,  # down's scale_2 [E], folded into the activation
    route_ptr,  # [P] routing weights
    ids_ptr,  # [P] experts
    act_ptr,  # [P, I] out
    H,
    inter,
    tokens,  # ROUTED=False: the tokens, one per A row
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_am,
    TOP_K: tl.constexpr,
    KW: tl.constexpr,
    UNROLL: tl.constexpr,
    # False: one dense gate_up (a dense MLP) for all tokens at once (A row g: token g), no routing weight or down
    # scale folded in; True: a program per (token, slot) pair, every A row the pair's token
    ROUTED: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    stride_wn = aligned4(stride_wn)
    stride_xm = aligned4(stride_xm)
    pair = tl.program_id(0)
    j0 = tl.program_id(1) * 4
    if ROUTED:
        e = tl.load(ids_ptr + pair).to(tl.int64)
    else:
        e = tl.full([], 0, tl.int64)
    i, layout_ok = lane_ids(32 * KW)
    g = (i % 32) // 4
    row = (
        tl.where(g % 2 == 0, 0, inter) + j0 + g // 2
    )  # B column g: gate (even) or up (odd) of column j0 + g/2
    w_rows = w_ptr + e * stride_we + row.to(tl.int64) * stride_wn
    s_rows = s_ptr + e * stride_se + row.to(tl.int64) * stride_sn
    if ROUTED:
        token = pair // TOP_K + i * 0
    else:
        token = tl.minimum(g, tokens - 1)
    x_rows = x_ptr + token.to(tl.int64) * stride_xm
    lane_word = (i // 32) * 16 + (i % 4) * 4
    acc = k_loop(
        w_rows, x_rows, x_rows, s_rows, H // 8, lane_word, zero_acc(32 * KW), 16 * KW, UNROLL, ASM, False
    )
    # [32]: lane 4g + t: C row g (the pair's token, or token g), columns 2t (gate of j0 + t) and 2t + 1 (up of it)
    gate, up = lane_sums(acc, KW)
    gate = gate * fold_scale(s2_ptr, e, True, ASM) * layout_ok
    up = up * fold_scale(s2_ptr, e, True, ASM)
    h = geglu_sigmoid(gate, up)
    if ROUTED:
        h = h * (tl.load(route_ptr + pair).to(tl.float32) * fold_scale(down_s2_ptr, e, True, ASM))
    j = tl.arange(0, 32)
    col = j0 + j % 4
    if ROUTED:
        tl.store(
            act_ptr + pair * stride_am + col, h.to(act_ptr.dtype.element_ty), mask=(j < 4) & (col < inter)
        )
    else:
        out = act_ptr + (j // 4).to(tl.int64) * stride_am + col
        tl.store(out, h.to(act_ptr.dtype.element_ty), mask=(j // 4 < tokens) & (col < inter))


@triton.jit
def _moe_frag_down_kernel(
    act_ptr,  # [P, I] as int32 bf16 pairs (already weighted and scaled)
    w_ptr,  # [E, H, I/8] int32 words
    s_ptr,  # [E, H, I/16]
    ids_ptr,  # [P]
    out_ptr,  # [T, H]
    H,
    inter,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    TOP_K: tl.constexpr,  # a power of two: one warp a slot
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    stride_wn = aligned4(stride_wn)
    stride_am = aligned4(stride_am)
    token = tl.program_id(0)
    i, layout_ok = lane_ids(32 * TOP_K)
    g = (i % 32) // 4
    pair = token * TOP_K + i // 32  # warp -> top-k slot
    e = tl.load(ids_ptr + pair).to(tl.int64)
    row = tl.minimum(tl.program_id(1) * 8 + g, H - 1)
    w_rows = w_ptr + e * stride_we + row.to(tl.int64) * stride_wn
    s_rows = s_ptr + e * stride_se + row.to(tl.int64) * stride_sn
    x_rows = act_ptr + pair.to(tl.int64) * stride_am
    lane_word = (i % 4) * 4  # each warp takes every step of its own expert
    acc = k_loop(
        w_rows, x_rows, x_rows, s_rows, inter // 8, lane_word, zero_acc(32 * TOP_K), 16, 1, ASM, False
    )
    total0, total1 = lane_sums(
        acc, TOP_K
    )  # [32]: output rows 2t, 2t + 1 of the program's 8, alike for every g
    total0, total1 = total0 * layout_ok, total1 * layout_ok
    j = tl.arange(0, 32)
    out_row = tl.program_id(1) * 8 + 2 * (j % 4)
    base = out_ptr + token * stride_om + out_row
    dtype = out_ptr.dtype.element_ty
    tl.store(base, total0.to(dtype), mask=(j < 4) & (out_row < H))
    tl.store(base + 1, total1.to(dtype), mask=(j < 4) & (out_row + 1 < H))


def frag_experts_supported(x: torch.Tensor, gate_up: object, down: object) -> bool:
    """bf16 tokens on an SM80+ GPU and stacked NVFP4 experts whose widths are multiples of 32, in the row layout
    `gemv_mma.fragment_layout_ok` checks: what the fragment MoE kernels (here and in `moe_frag_grouped.py`) take."""
    if not (isinstance(gate_up, NVFP4Tensor) and isinstance(down, NVFP4Tensor)):
        return False
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or gate_up.packed.dim() != 3:
        return False
    _, two_inter, hidden = gate_up.shape
    return (
        hidden % 32 == 0
        and (two_inter // 2) % 32 == 0
        and fragment_layout_ok(gate_up)
        and fragment_layout_ok(down)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def moe_frag_supported(x: torch.Tensor, gate_up: object, down: object, top_k: int) -> bool:
    """`frag_experts_supported`, 1-8 tokens, top-k a power of two up to 16 (one warp a slot in the down
    projection)."""
    tokens = x.numel() // x.shape[-1]
    return (
        1 <= tokens <= MOE_MAX_TOKENS
        and top_k in (1, 2, 4, 8, 16)
        and frag_experts_supported(x, gate_up, down)
    )


def fused_moe_frag(
    x: torch.Tensor,
    ids: torch.Tensor,
    route: torch.Tensor,
    gate_up: NVFP4Tensor,
    down: NVFP4Tensor,
    *,
    top_k: int,
    k_warps: int = 2,
    unroll: int = 1,  # the best of 5 configs on the H100 at 1, 4 and 8 tokens (session 19)
) -> torch.Tensor:
    """x [T, H] bf16, ids/route [T * top_k] -> [T, H] (see the module docstring; `moe_frag_supported` first)."""
    tokens, hidden = x.shape
    inter = gate_up.shape[1] // 2
    if x.stride(-1) != 1 or x.stride(0) % 8:
        x = x.contiguous()
    gu_packed, gu_scale, gu_s2 = gate_up.kernel_operands()
    dn_packed, dn_scale, dn_s2 = down.kernel_operands()
    asm = 2 if gate_up.normal_scales() and down.normal_scales() else 1
    pairs = ids.numel()
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _moe_frag_gate_up_kernel[(pairs, inter // 4)](
        x.view(torch.int32), gu_packed.view(torch.int32), gu_scale, gu_s2, dn_s2, route, ids, act, hidden, inter,
        tokens, x.stride(0) // 2, gu_packed.stride(0) // 4, gu_packed.stride(1) // 4, gu_scale.stride(0),
        gu_scale.stride(1), act.stride(0),
        TOP_K=top_k, KW=k_warps, UNROLL=unroll, ROUTED=True, ASM=asm, num_warps=k_warps, num_stages=1, **pdl_args(x.device),
    )  # fmt: skip
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    _moe_frag_down_kernel[(tokens, triton.cdiv(hidden, 8))](
        act.view(torch.int32), dn_packed.view(torch.int32), dn_scale, ids, out, hidden, inter,
        act.stride(0) // 2, dn_packed.stride(0) // 4, dn_packed.stride(1) // 4, dn_scale.stride(0),
        dn_scale.stride(1), out.stride(0),
        TOP_K=top_k, ASM=asm, num_warps=top_k, num_stages=1, **pdl_args(x.device),
    )  # fmt: skip
    return out


def frag_geglu_supported(x: torch.Tensor, weight: object) -> bool:
    """`frag_gate_up_geglu` takes it: 1-8 bf16 tokens on an SM80+ GPU, a 2-D NVFP4 [2I, K] weight, I % 4 == 0."""
    return (
        isinstance(weight, NVFP4Tensor)
        and weight.packed.dim() == 2
        and x.dim() == 2
        and x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and 1 <= x.shape[0] <= MOE_MAX_TOKENS
        and x.shape[1] % 32 == 0
        and weight.shape[0] % 8 == 0
        and fragment_layout_ok(weight)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def frag_gate_up_geglu(
    x: torch.Tensor, weight: NVFP4Tensor, *, k_warps: int = 2, unroll: int = 2
) -> torch.Tensor:
    """gelu_tanh(x @ gate^T) * (x @ up^T) for a dense MLP's fused [gate | up] weight [2I, K], 1-8 bf16 tokens,
    in one launch (the gate_up kernel above with one "expert" and no routing): [T, I]."""
    tokens, hidden = x.shape
    inter = weight.shape[0] // 2
    if x.stride(-1) != 1 or x.stride(0) % 8:
        x = x.contiguous()
    packed, scale, s2 = weight.kernel_operands(stacked=True)
    asm = 2 if weight.normal_scales() else 1
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    _moe_frag_gate_up_kernel[(1, inter // 4)](  # every token in one program's A rows: the weight read once
        x.view(torch.int32), packed.view(torch.int32), scale, s2, s2, s2, s2, out, hidden, inter, tokens,
        x.stride(0) // 2, packed.stride(0) // 4, packed.stride(1) // 4, scale.stride(0), scale.stride(1),
        out.stride(0),
        TOP_K=1, KW=k_warps, UNROLL=unroll, ROUTED=False, ASM=asm, num_warps=k_warps, num_stages=1,
        **pdl_args(x.device),
    )  # fmt: skip
    return out
