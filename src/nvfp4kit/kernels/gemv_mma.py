"""W4A16 GEMV for 1-16 tokens with the FP4 weights decoded straight into tensor-core fragments (SM80+, GPU only).

At decode sizes a linear is a stream of packed weights; what limits our Triton kernels there is not the bytes but
the instructions around them (docs/benchmarks.md, sessions 14-17: 6-7 a weight, layout conversions through shared
memory every K step). Here every lane owns its data by construction, as in Marlin's inner loop:

- a program is 8 weight rows and KW warps splitting K; its tensors are [32 x KW] (element i held by thread i,
  `lane_ids`), and lane 4g + t holds row g of the 8 (and token g of the activations) and the t-th quarter of each
  K chunk. That is the register layout of `mma.sync.m16n8k16`'s operands: B (the weights) has column n = g and K
  pair t, A (the tokens) has row g and K pair t. (Multi-dimensional tensors would leave the lane order to the
  compiler: Triton 3.6 and 3.9 order such a [warps, 8, 4] tensor's lanes differently.)
- each lane loads 4 32-bit words of packed weights (8 FP4 values a word, 16-byte vector loads) and the
  matching activation pairs, decodes a word into four bf16x2 registers (`nvfp4_tile._k_order_ptx`'s byte
  permutes, one LOP3 and a packed FMA with the block scale per pair of weights) and feeds them to two MMAs in the
  same PTX block: no shared memory, no layout conversion, ~2.8 instructions a weight.
- The K order inside a chunk is permuted (lane t takes 16 consecutive bytes, not MMA K pairs 2t and 2t + 8): a
  dot product does not care, as long as weights and activations are permuted alike. The four activation pairs of
  a word are A's four registers as loaded: rows g and g + 8 then mix bytes, and each of the two MMAs keeps the one
  row whose pairing is right (`_WORD_MMA_PTX`); lane 4g + t ends with token g's outputs for weight rows 2t and
  2t + 1 of the program's eight.
- 9-16 tokens (T16): A rows g + 8 carry tokens 8-15 at the same K pairs, both MMAs of a word add into one quad
  (`_WORD_MMA16_PTX`), at twice the activation loads a weight word.
- NW row groups: a program's warps may also take different groups of 8 rows (KW x NW warps), sharing the tokens'
  activations through L1.
- Measured ~3.6 SASS instructions a weight in the main loop (sm_90, compiled on the CPU), against 6.25-7.25 for
  the tensor-core tiles of `w4a16_linear` at one token; on the H100 1.04-1.5x faster than those tiles at 1-8
  tokens (docs/benchmarks.md, "Session 19").

The warps' K partials are summed once at the end. Values: e2m1 * scale * 2**-62 exactly in bf16 (the PTX
decoder's fold), fp32 accumulation, the tensor scale and 2**62 applied to the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import fold_scale, k_order_byte_ptx, scale_operand
from nvfp4kit.kernels.path_limits import FRAG_MAX_TOKENS, MOE_FRAG_MAX_TOKENS

# the MMA's 16 A rows (1-8 tokens: rows g + 8 mix the same token's pairs, see below)
MAX_TOKENS = FRAG_MAX_TOKENS
MOE_MAX_TOKENS = MOE_FRAG_MAX_TOKENS  # moe_frag.py's kernels take the 1-8 token form

# Four packed weight bytes ($8) and their block scale ($9, bf16x2 * 2**64 in both halves) decoded in K order (byte j
# -> bf16x2 b_j = its low and high nibble's weights), then two MMAs whose A is the bytes' four activation pairs as
# loaded ($10..$13, one 16-byte load, no register moves): A rows g and g + 8 hold pairs (0, 2) and (1, 3). With B =
# (b0, b2) row g is the right sum (pairs 0 and 2 meet bytes 0 and 2) and row g + 8 is cross terms; with B = (b1, b3)
# it is the other way round. So the first MMA accumulates quad $14..$17 into $0..$3 (row g kept), the second
# $18..$21 into $4..$7 (row g + 8 kept). (Outputs and inputs are separate operands; ptxas drops the copies.)
_WORD_MMA_PTX = tl.constexpr(
    """
{
.reg .b32 q4, t, u, r, sm, b0, b1, b2, b3;
mov.b32 sm, 0x80008000;
shl.b32 q4, $8, 4;
"""
    + "".join(k_order_byte_ptx(j, "$8", "$9", f"b{j}") + "\n" for j in range(4))
    + """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$10, $11, $12, $13}, {b0, b2}, {$14, $15, $16, $17};
mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$4, $5, $6, $7}, {$10, $11, $12, $13}, {b1, b3}, {$18, $19, $20, $21};
}
"""
)

# 9-16 tokens: A rows g and g + 8 are tokens g and g + 8, each register their pairs at the same K positions (token
# g's pair j with token g + 8's pair j), so both MMAs of a word accumulate into one quad whose four values are all
# wanted: lane 4g + t ends with tokens g and g + 8 for weight rows 2t and 2t + 1. Inputs: word $4, scale $5, token
# g's pairs $6..$9, token g + 8's $10..$13, accumulator $14..$17.
_WORD_MMA16_PTX = tl.constexpr(
    """
{
.reg .b32 q4, t, u, r, sm, b0, b1, b2, b3;
mov.b32 sm, 0x80008000;
shl.b32 q4, $4, 4;
"""
    + "".join(k_order_byte_ptx(j, "$4", "$5", f"b{j}") + "\n" for j in range(4))
    + """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$6, $10, $8, $12}, {b0, b2}, {$14, $15, $16, $17};
mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$7, $11, $9, $13}, {b1, b3}, {$0, $1, $2, $3};
}
"""
)


@triton.jit
def _word_mma(word, scale, x0, x1, x2, x3, acc):
    return tl.inline_asm_elementwise(
        _WORD_MMA_PTX,
        "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f,f,f,f,f",
        [word, scale, x0, x1, x2, x3, acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]],
        dtype=(tl.float32,) * 8,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _word_mma16(word, scale, g0, g1, g2, g3, h0, h1, h2, h3, acc):
    return tl.inline_asm_elementwise(
        _WORD_MMA16_PTX,
        "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,f,f,f,f",
        [word, scale, g0, g1, g2, g3, h0, h1, h2, h3, acc[0], acc[1], acc[2], acc[3]],
        dtype=(tl.float32,) * 4,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _quarters(v):
    """[L, 4] -> its four [L] columns, in order (in-thread: the 4 are one lane's registers)."""
    a, b = tl.split(tl.reshape(v, [v.shape[0], 2, 2]))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _pair_scale(s, ASM: tl.constexpr):
    """E4M3 block-scale bytes -> the PTX's scale operand (bf16 * 2**64) in both halves of an int32."""
    sc = scale_operand(s, ASM).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (sc | (sc << 16)).to(tl.int32, bitcast=True)


@triton.jit
def aligned4(stride):
    """A row stride in int32 words (a multiple of 4: 16-byte rows, checked by the callers) in a form the compiler
    knows to be one: `tl.multiple_of` on a scalar argument was not kept, and rows of 88 or 264 words (the 704-wide
    expert down projection, 2,112-wide dense down) got four 32-bit loads a step instead of one 16-byte load
    (sm_90 SASS); `// 4 * 4` is kept."""
    return stride // 4 * 4


@triton.jit
def _pair_scales(s_pair, ASM: tl.constexpr):
    """Two E4M3 block-scale bytes loaded as one little-endian uint16 (the first block's in the low byte) -> their
    `_pair_scale` operands. ASM == 2 (normal scales): `nvfp4_tile.scale_operand`'s bit placement on both bytes at
    once, and x 0x10001 copies each 16-bit operand into both halves."""
    if ASM == 2:
        v = s_pair.to(tl.uint32)
        lo = ((v & 0x7F) << 4) + (184 << 7)
        hi = ((v >> 4) & 0x7F0) + (184 << 7)
        return (lo * 0x10001).to(tl.int32, bitcast=True), (hi * 0x10001).to(tl.int32, bitcast=True)
    return _pair_scale((s_pair & 0xFF).to(tl.uint8), ASM), _pair_scale((s_pair >> 8).to(tl.uint8), ASM)


@triton.jit
def lane_ids(L: tl.constexpr):
    """(`arange(L)`, 1.0 if element i of it is held by thread i, else NaN). The MMA's operands are exchanged between
    lanes by position, so every kernel here indexes with these and multiplies its output by the second: a
    compiler that placed the [L] elements (L = 32 x warps) differently makes the result NaN, never wrong."""
    tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [tl.arange(0, L)], dtype=tl.int32,
                                    is_pure=True, pack=1)  # fmt: skip
    i = tl.arange(0, L)
    return i, tl.where(tl.max(tl.abs(tid - i), 0) == 0, 1.0, float("nan"))


@triton.jit
def _pairs(x_rows, pairs, words, MASKED: tl.constexpr):
    if MASKED:
        xp = tl.load(x_rows[:, None] + pairs, mask=pairs < 4 * words, other=0)
    else:
        xp = tl.load(x_rows[:, None] + pairs)
    return xp


@triton.jit
def word_acts(x_rows, x_hi, fw, w: tl.constexpr, words, MASKED: tl.constexpr, T16: tl.constexpr):
    """Word `w`'s four activation pairs of the lane's token (one 16-byte load) and, with T16, of token g + 8."""
    pairs = 4 * (fw + w) + tl.arange(0, 4)[None, :]
    xp = _pairs(x_rows, pairs, words, MASKED)
    if T16:
        hp = _pairs(x_hi, pairs, words, MASKED)
    else:
        hp = xp
    return xp, hp


@triton.jit
def word_mma(word, scale, xp, hp, acc, T16: tl.constexpr):
    """A packed word's two MMAs against its activation pairs (`_word_mma`; T16 `_word_mma16`)."""
    x0, x1, x2, x3 = _quarters(xp)
    if T16:
        h0, h1, h2, h3 = _quarters(hp)
        out = _word_mma16(word, scale, x0, x1, x2, x3, h0, h1, h2, h3, acc)
    else:
        out = _word_mma(word, scale, x0, x1, x2, x3, acc)
    return out


@triton.jit
def step_weights(w_rows, s_rows, first, words, MASKED: tl.constexpr, ASM: tl.constexpr):
    """A lane's 4 packed words of a step (one 16-byte load) and their two block scales as MMA scale operands."""
    wv = tl.arange(0, 4)[None, :]
    fw = first[:, None]
    # words 0, 1 share the first block scale, words 2, 3 the second: the two bytes at first / 2 (even: `first` is a
    # multiple of 4 and scale rows hold K / 16 bytes, K % 32 == 0) in one 16-bit load
    pair_ptr = (s_rows + first // 2).to(tl.pointer_type(tl.uint16))
    if MASKED:  # `words` is a multiple of 4 too: a lane's 4 words are all in or all out
        packed = tl.load(w_rows[:, None] + fw + wv, mask=fw + wv < words, other=0)
        s_pair = tl.load(pair_ptr, mask=first < words, other=0)
    else:
        packed = tl.load(w_rows[:, None] + fw + wv)
        s_pair = tl.load(pair_ptr)
    w0, w1, w2, w3 = _quarters(packed)
    s_lo, s_hi = _pair_scales(s_pair, ASM)
    return w0, w1, w2, w3, s_lo, s_hi


@triton.jit
def k_step(w_rows, x_rows, x_hi, s_rows, first, words, acc, MASKED: tl.constexpr, ASM: tl.constexpr,
           T16: tl.constexpr):  # fmt: skip
    """One K step of each lane ([L] row pointers, `first` [L] its first word): 4 packed words (32 weights, one
    16-byte load), their 16 activation pairs (four 16-byte loads, eight with T16) and 2 block scales, 8 MMAs.
    Loads are [L, 4] with the 4 in one lane (a wider one may be spread over lanes). MASKED: K's tail."""
    w0, w1, w2, w3, s_lo, s_hi = step_weights(w_rows, s_rows, first, words, MASKED, ASM)
    fw = first[:, None]
    xp, hp = word_acts(x_rows, x_hi, fw, 0, words, MASKED, T16)
    acc = word_mma(w0, s_lo, xp, hp, acc, T16)
    xp, hp = word_acts(x_rows, x_hi, fw, 1, words, MASKED, T16)
    acc = word_mma(w1, s_lo, xp, hp, acc, T16)
    xp, hp = word_acts(x_rows, x_hi, fw, 2, words, MASKED, T16)
    acc = word_mma(w2, s_hi, xp, hp, acc, T16)
    xp, hp = word_acts(x_rows, x_hi, fw, 3, words, MASKED, T16)
    acc = word_mma(w3, s_hi, xp, hp, acc, T16)
    return acc


@triton.jit
def k_loop(w_rows, x_rows, x_hi, s_rows, words, lane_word, acc, STEP: tl.constexpr, UNROLL: tl.constexpr,
           ASM: tl.constexpr, T16: tl.constexpr):  # fmt: skip
    """`acc` plus the products of `words` packed words of each lane's row with its token's activations (T16: and
    token g + 8's, rows `x_hi`); lane_word [L]: the lane's first word of a step, STEP words a step (16 a warp that
    takes its own steps), the tail masked."""
    full = words // (STEP * UNROLL) * (STEP * UNROLL)
    for w0 in range(0, full, STEP * UNROLL):
        for u in tl.static_range(UNROLL):
            acc = k_step(w_rows, x_rows, x_hi, s_rows, w0 + u * STEP + lane_word, words, acc, False, ASM, T16)
    for w0 in range(full, words, STEP):
        acc = k_step(w_rows, x_rows, x_hi, s_rows, w0 + lane_word, words, acc, True, ASM, T16)
    return acc


@triton.jit
def zero_acc(L: tl.constexpr):
    z = tl.zeros([L], tl.float32)
    return (z, z, z, z, z, z, z, z)  # the two MMA C quads of each lane


@triton.jit
def zero_acc16(L: tl.constexpr):
    z = tl.zeros([L], tl.float32)
    return (z, z, z, z)  # one C quad: tokens g and g + 8


@triton.jit
def group_sum(v, KW: tl.constexpr, NW: tl.constexpr):
    """[32 x KW x NW] lanes -> [32 x NW]: the sums over the KW warps that split K, per row group of 8."""
    return tl.reshape(tl.sum(tl.reshape(v, [NW, KW, 32]), axis=1), [NW * 32])


@triton.jit
def lane_sums(acc, KW: tl.constexpr, NW: tl.constexpr = 1):
    """[32 x NW] x 2 of the 1-8 token form: C row g of quad 0 plus row g + 8 of quad 1 (token g's sums for B columns
    2t and 2t + 1 of lane 4g + t in each row group), summed over the KW warps that split K."""
    return group_sum(acc[0] + acc[6], KW, NW), group_sum(acc[1] + acc[7], KW, NW)


@triton.jit
def _gemv_mma_kernel(
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
    NW: tl.constexpr,  # row groups of 8 a program (warps sharing the tokens' activations through L1)
    UNROLL: tl.constexpr,
    ASM: tl.constexpr,
    T16: tl.constexpr,  # 9-16 tokens: A rows g + 8 carry tokens 8-15 (`_WORD_MMA16_PTX`)
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # rows of 16-byte multiples (K % 32 == 0, checked by the caller): 16-byte loads at any K
    stride_wn = aligned4(stride_wn)
    stride_xm = aligned4(stride_xm)
    i, layout_ok = lane_ids(32 * KW * NW)
    g = (i % 32) // 4  # the lane's B column (weight row of its group's 8) and A row (token)
    warp = i // 32
    first_row = tl.program_id(0) * 8 * NW
    # lanes past N or M read row N - 1 / token M - 1 (in bounds, no masks in the loop); their results are not stored
    row = tl.minimum(first_row + (warp // KW) * 8 + g, N - 1)
    token = tl.minimum(g, M - 1)
    w_rows = w_ptr + row.to(tl.int64) * stride_wn
    x_rows = x_ptr + token.to(tl.int64) * stride_xm
    s_rows = s_ptr + row.to(tl.int64) * stride_sn
    lane_word = (warp % KW) * 16 + (
        i % 4
    ) * 4  # the KW warps of a row group take 16-word (64-byte) steps in turn
    scale = fold_scale(s2_ptr, 0, True, ASM) * layout_ok
    j = tl.arange(0, 32 * NW)
    out_tok = (j % 32) // 4
    out_row = first_row + (j // 32) * 8 + 2 * (j % 4)  # C columns 2t and 2t + 1 of each row group
    base = out_ptr + out_tok.to(tl.int64) * stride_om + out_row
    dtype = out_ptr.dtype.element_ty
    if T16:
        x_hi = x_ptr + tl.minimum(g + 8, M - 1).to(tl.int64) * stride_xm
        acc = k_loop(w_rows, x_rows, x_hi, s_rows, K // 8, lane_word, zero_acc16(32 * KW * NW), 16 * KW, UNROLL,
                     ASM, True)  # fmt: skip
        hi = base + 8 * stride_om
        hi_ok = out_tok + 8 < M
        tl.store(base, (group_sum(acc[0], KW, NW) * scale).to(dtype), mask=out_row < N)
        tl.store(base + 1, (group_sum(acc[1], KW, NW) * scale).to(dtype), mask=out_row + 1 < N)
        tl.store(hi, (group_sum(acc[2], KW, NW) * scale).to(dtype), mask=hi_ok & (out_row < N))
        tl.store(hi + 1, (group_sum(acc[3], KW, NW) * scale).to(dtype), mask=hi_ok & (out_row + 1 < N))
    else:
        acc = k_loop(w_rows, x_rows, x_rows, s_rows, K // 8, lane_word, zero_acc(32 * KW * NW), 16 * KW, UNROLL,
                     ASM, False)  # fmt: skip
        total0, total1 = lane_sums(acc, KW, NW)
        ok = out_tok < M
        tl.store(base, (total0 * scale).to(dtype), mask=ok & (out_row < N))
        tl.store(base + 1, (total1 * scale).to(dtype), mask=ok & (out_row + 1 < N))


def fragment_layout_ok(weight: NVFP4Tensor) -> bool:
    """The row layout the fragment kernels assume of a (stacked) NVFP4 weight: packed rows of 16-byte multiples
    (`aligned4` turns the word stride into a multiple of 4) and scale rows of even length from an even address (a
    step's two scale bytes are one 16-bit load). Contiguous weights with K % 32 == 0 always qualify."""
    packed, scale = weight.packed, weight.scale
    return (
        packed.stride(-1) == 1
        and scale.stride(-1) == 1
        and all(st % 16 == 0 for st in packed.stride()[:-1])
        and all(st % 2 == 0 for st in scale.stride()[:-1])
        and scale.data_ptr() % 2 == 0
    )


def gemv_mma_supported(x: torch.Tensor, weight: NVFP4Tensor) -> bool:
    """bf16 activations of 1-16 tokens on an SM80+ GPU, a 2-D weight whose K is a multiple of 32
    (`fragment_layout_ok`)."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or weight.packed.dim() != 2:
        return False
    m = x.numel() // x.shape[-1]
    return (
        1 <= m <= MAX_TOKENS
        and x.shape[-1] % 32 == 0
        and fragment_layout_ok(weight)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def gemv_mma(
    x: torch.Tensor, weight: NVFP4Tensor, *, k_warps: int = 4, unroll: int = 2, row_groups: int = 1
) -> torch.Tensor:
    """x [..., K] (bf16, 1-8 rows) @ dequant(weight [N, K])^T -> [..., N] bf16 (see the module docstring)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} features, the weight expects {k}")
    if not gemv_mma_supported(x, weight):
        raise ValueError(
            "gemv_mma needs bf16 activations of 1-16 tokens on an SM80+ GPU, K % 32 == 0 and weight rows laid out "
            "as fragment_layout_ok checks"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8:
        x2 = x2.contiguous()
    m = x2.shape[0]
    packed, scale, s2 = weight.kernel_operands()
    if packed.data_ptr() % 16:  # the rows' layout is `fragment_layout_ok`'s (gemv_mma_supported)
        raise ValueError("gemv_mma needs packed weights that start on a 16-byte boundary")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    asm = 2 if weight.normal_scales() else 1
    _gemv_mma_kernel[(triton.cdiv(n, 8 * row_groups),)](
        x2.view(torch.int32), packed.view(torch.int32), scale, s2, out, m, n, k,
        x2.stride(0) // 2, packed.stride(0) // 4, scale.stride(0), out.stride(0),
        KW=k_warps, NW=row_groups, UNROLL=unroll, ASM=asm, T16=m > 8, num_warps=k_warps * row_groups, num_stages=1,
        **pdl_args(x.device),
    )  # fmt: skip
    return out.reshape(*lead, n)
