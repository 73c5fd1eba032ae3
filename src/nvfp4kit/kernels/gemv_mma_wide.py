"""The fragment GEMV of `gemv_mma.py` for 17-128 tokens: every packed weight word is decoded once and multiplied
into up to four 16-token groups (SM80+, GPU only).

At 17-128 tokens the tensor-core tiles of `w4a16_linear` run the 26B-A4B linears at 8-26% of the copy bandwidth and
1.0-2.4x slower than BF16 cuBLAS (H100, `nvfp4kit bench kernels`, session 23): each K step converts the decoded
tile through shared memory into the MMA's operand layout. Here the lanes own their data as in `gemv_mma.py`'s
9-16 token form (lane 4g + t: weight row g of the program's 8, the t-th quarter of each K chunk; A rows g and
g + 8 are tokens 16j + g and 16j + g + 8 of group j): a word's four bf16x2 weight registers are decoded once
(`_DECODE_WORD_PTX`) and fed to two MMAs a group (`_MMA16_PTX`), so the decode costs the same at 64 tokens as at
16; the activations are loaded per group (two 16-byte loads a word), shared by a program's row groups through L1.
A program takes up to 64 tokens (GROUPS x 16); more tokens add programs along the grid's second axis, each
reading the weights again (from L2 when the programs run close together).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.gemv_mma import (
    _pairs,
    _quarters,
    aligned4,
    fragment_layout_ok,
    group_sum,
    lane_ids,
    step_weights,
)
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import fold_scale, k_order_byte_ptx
from nvfp4kit.kernels.path_limits import FRAG_MAX_TOKENS, FRAG_WIDE_MAX_TOKENS

MAX_GROUPS = 4  # 16-token groups a program
MIN_TOKENS, MAX_TOKENS = FRAG_MAX_TOKENS + 1, FRAG_WIDE_MAX_TOKENS

# A packed word ($4) and its block scale ($5, bf16x2 * 2**64 in both halves) -> its bytes' bf16x2 weights b0..b3
# ($0..$3) in K order (`gemv_mma._WORD_MMA16_PTX`'s decode, on its own so that several token groups share it)
_DECODE_WORD_PTX = tl.constexpr(
    "\n{\n.reg .b32 q4, t, u, r, sm;\nmov.b32 sm, 0x80008000;\nshl.b32 q4, $4, 4;\n"
    + "".join(k_order_byte_ptx(j, "$4", "$5", f"${j}") + "\n" for j in range(4))
    + "}\n"
)

# A word's two MMAs for one 16-token group: weights b0..b3 ($4..$7), token g's four activation pairs ($8..$11) and
# token g + 8's ($12..$15), accumulator quad $16..$19 -> $0..$3 (`gemv_mma._WORD_MMA16_PTX` without the decode)
_MMA16_PTX = tl.constexpr(
    """
mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$8, $12, $10, $14}, {$4, $6}, {$16, $17, $18, $19};
mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$9, $13, $11, $15}, {$5, $7}, {$0, $1, $2, $3};
"""
)


@triton.jit
def _decode_word(word, scale):
    return tl.inline_asm_elementwise(
        _DECODE_WORD_PTX, "=r,=r,=r,=r,r,r", [word, scale], dtype=(tl.int32,) * 4, is_pure=True, pack=1
    )


@triton.jit
def _group_mma(b, x_rows, x_hi, fw, w: tl.constexpr, words, acc, MASKED: tl.constexpr):
    """Word `w`'s MMAs (decoded weights `b`) against one token group's activation pairs: rows `x_rows` (tokens g)
    and `x_hi` (tokens g + 8), one 16-byte load each."""
    pairs = 4 * (fw + w) + tl.arange(0, 4)[None, :]
    x0, x1, x2, x3 = _quarters(_pairs(x_rows, pairs, words, MASKED))
    h0, h1, h2, h3 = _quarters(_pairs(x_hi, pairs, words, MASKED))
    return tl.inline_asm_elementwise(
        _MMA16_PTX,
        "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,r,r,f,f,f,f",
        [b[0], b[1], b[2], b[3], x0, x1, x2, x3, h0, h1, h2, h3, acc[0], acc[1], acc[2], acc[3]],
        dtype=(tl.float32,) * 4,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _word(word, scale, xs, fw, w: tl.constexpr, words, accs, MASKED: tl.constexpr, GROUPS: tl.constexpr):
    """Decode word `w` once and add its products into each of the GROUPS token groups' accumulators."""
    b = _decode_word(word, scale)
    a0 = _group_mma(b, xs[0], xs[1], fw, w, words, accs[0], MASKED)
    a1 = accs[1]
    a2 = accs[2]
    a3 = accs[3]
    if GROUPS > 1:
        a1 = _group_mma(b, xs[2], xs[3], fw, w, words, accs[1], MASKED)
    if GROUPS > 2:
        a2 = _group_mma(b, xs[4], xs[5], fw, w, words, accs[2], MASKED)
    if GROUPS > 3:
        a3 = _group_mma(b, xs[6], xs[7], fw, w, words, accs[3], MASKED)
    return a0, a1, a2, a3


@triton.jit
def _k_step(
    w_rows, xs, s_rows, first, words, accs, MASKED: tl.constexpr, ASM: tl.constexpr, GROUPS: tl.constexpr
):
    """One K step of each lane: 4 packed words (one 16-byte load), 2 block scales, per group 8 MMAs."""
    w0, w1, w2, w3, s_lo, s_hi = step_weights(w_rows, s_rows, first, words, MASKED, ASM)
    fw = first[:, None]
    accs = _word(w0, s_lo, xs, fw, 0, words, accs, MASKED, GROUPS)
    accs = _word(w1, s_lo, xs, fw, 1, words, accs, MASKED, GROUPS)
    accs = _word(w2, s_hi, xs, fw, 2, words, accs, MASKED, GROUPS)
    accs = _word(w3, s_hi, xs, fw, 3, words, accs, MASKED, GROUPS)
    return accs


@triton.jit
def _store_group(acc, base, stride_om, out_tok, out_row, M, N, scale, KW: tl.constexpr, NW: tl.constexpr):
    """A group's quad: tokens g (values 0, 1) and g + 8 (2, 3) of weight rows 2t and 2t + 1, summed over K warps."""
    dtype = base.dtype.element_ty
    lo_ok = out_tok < M
    hi_ok = out_tok + 8 < M
    hi = base + 8 * stride_om
    tl.store(base, (group_sum(acc[0], KW, NW) * scale).to(dtype), mask=lo_ok & (out_row < N))
    tl.store(base + 1, (group_sum(acc[1], KW, NW) * scale).to(dtype), mask=lo_ok & (out_row + 1 < N))
    tl.store(hi, (group_sum(acc[2], KW, NW) * scale).to(dtype), mask=hi_ok & (out_row < N))
    tl.store(hi + 1, (group_sum(acc[3], KW, NW) * scale).to(dtype), mask=hi_ok & (out_row + 1 < N))


@triton.jit
def _gemv_mma_wide_kernel(
    x_ptr,  # activations viewed as int32 bf16 pairs [M, K/2]
    w_ptr,  # packed weights viewed as int32 words [N, K/8]
    s_ptr,  # E4M3 block scales [N, K/16]
    s2_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,  # in pairs
    stride_wn,  # in words
    stride_sn,
    stride_om,
    KW: tl.constexpr,  # warps splitting K
    NW: tl.constexpr,  # row groups of 8 a program
    UNROLL: tl.constexpr,
    ASM: tl.constexpr,
    GROUPS: tl.constexpr,  # 16-token groups a program (1-4)
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    stride_wn = aligned4(stride_wn)
    stride_xm = aligned4(stride_xm)
    i, layout_ok = lane_ids(32 * KW * NW)
    g = (i % 32) // 4
    warp = i // 32
    first_row = tl.program_id(0) * 8 * NW
    first_tok = tl.program_id(1) * 16 * GROUPS
    # lanes past N or M read row N - 1 / token M - 1 (in bounds, no masks in the loop); their results are not stored
    row = tl.minimum(first_row + (warp // KW) * 8 + g, N - 1)
    w_rows = w_ptr + row.to(tl.int64) * stride_wn
    s_rows = s_ptr + row.to(tl.int64) * stride_sn
    xs = (
        x_ptr + tl.minimum(first_tok + g, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 8, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 16, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 24, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 32, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 40, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 48, M - 1).to(tl.int64) * stride_xm,
        x_ptr + tl.minimum(first_tok + g + 56, M - 1).to(tl.int64) * stride_xm,
    )
    lane_word = (warp % KW) * 16 + (i % 4) * 4  # the KW warps of a row group take 16-word steps in turn
    z = tl.zeros([32 * KW * NW], tl.float32)
    accs = ((z, z, z, z), (z, z, z, z), (z, z, z, z), (z, z, z, z))
    words = K // 8
    step = 16 * KW
    full = words // (step * UNROLL) * (step * UNROLL)
    for w0 in range(0, full, step * UNROLL):
        for u in tl.static_range(UNROLL):
            accs = _k_step(w_rows, xs, s_rows, w0 + u * step + lane_word, words, accs, False, ASM, GROUPS)
    for w0 in range(full, words, step):
        accs = _k_step(w_rows, xs, s_rows, w0 + lane_word, words, accs, True, ASM, GROUPS)

    scale = fold_scale(s2_ptr, 0, True, ASM) * layout_ok
    j = tl.arange(0, 32 * NW)
    out_tok = first_tok + (j % 32) // 4
    out_row = first_row + (j // 32) * 8 + 2 * (j % 4)  # C columns 2t and 2t + 1 of each row group
    base = out_ptr + out_tok.to(tl.int64) * stride_om + out_row
    _store_group(accs[0], base, stride_om, out_tok, out_row, M, N, scale, KW, NW)
    if GROUPS > 1:
        _store_group(accs[1], base + 16 * stride_om, stride_om, out_tok + 16, out_row, M, N, scale, KW, NW)
    if GROUPS > 2:
        _store_group(accs[2], base + 32 * stride_om, stride_om, out_tok + 32, out_row, M, N, scale, KW, NW)
    if GROUPS > 3:
        _store_group(accs[3], base + 48 * stride_om, stride_om, out_tok + 48, out_row, M, N, scale, KW, NW)


def gemv_mma_wide_supported(x: torch.Tensor, weight: NVFP4Tensor) -> bool:
    """bf16 activations of 17-128 tokens on an SM80+ GPU, a 2-D weight with K % 32 == 0 (`fragment_layout_ok`)."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or weight.packed.dim() != 2:
        return False
    m = x.numel() // x.shape[-1]
    return (
        MIN_TOKENS <= m <= MAX_TOKENS
        and x.shape[-1] % 32 == 0
        and fragment_layout_ok(weight)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def token_groups(m: int, groups: int) -> int:
    """16-token groups a program takes for m tokens: as few programs along the tokens as `groups` allows, and no
    group that holds only padding."""
    programs = triton.cdiv(m, 16 * groups)
    return triton.cdiv(triton.cdiv(m, 16), programs)


def gemv_mma_wide(
    x: torch.Tensor,
    weight: NVFP4Tensor,
    *,
    k_warps: int = 2,
    unroll: int = 1,
    row_groups: int = 1,
    groups: int = MAX_GROUPS,
) -> torch.Tensor:
    """x [..., K] (bf16, 17-128 rows) @ dequant(weight [N, K])^T -> [..., N] bf16 (see the module docstring);
    `groups`: at most this many 16-token groups a program (1-4)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} features, the weight expects {k}")
    if not 1 <= groups <= MAX_GROUPS:
        raise ValueError(f"groups must be 1-{MAX_GROUPS}, got {groups}")
    if not gemv_mma_wide_supported(x, weight):
        raise ValueError(
            f"gemv_mma_wide needs bf16 activations of {MIN_TOKENS}-{MAX_TOKENS} tokens on an SM80+ GPU, K % 32 == 0 "
            "and weight rows laid out as fragment_layout_ok checks"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8:
        x2 = x2.contiguous()
    m = x2.shape[0]
    packed, scale, s2 = weight.kernel_operands()
    if packed.data_ptr() % 16:
        raise ValueError("gemv_mma_wide needs packed weights that start on a 16-byte boundary")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    per_program = token_groups(m, groups)
    grid = (triton.cdiv(n, 8 * row_groups), triton.cdiv(m, 16 * per_program))
    _gemv_mma_wide_kernel[grid](
        x2.view(torch.int32), packed.view(torch.int32), scale, s2, out, m, n, k,
        x2.stride(0) // 2, packed.stride(0) // 4, scale.stride(0), out.stride(0),
        KW=k_warps, NW=row_groups, UNROLL=unroll, ASM=2 if weight.normal_scales() else 1, GROUPS=per_program,
        num_warps=k_warps * row_groups, num_stages=1, **pdl_args(x.device),
    )  # fmt: skip
    return out.reshape(*lead, n)
