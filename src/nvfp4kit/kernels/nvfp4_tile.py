"""Triton building blocks shared by the W4A16 kernels: NVFP4 tile decode, weight-tile loads, the MMA step.

A weight tile is expanded in registers straight from the checkpoint layout (no repacking): `packed` uint8
[N, K/2] (even element in the low nibble), `scale` E4M3 bytes [N, K/16]. Every expanded value is
e2m1 * scale * 2**-FOLD_EXP exactly (E2M1 x E4M3 has at most 6 significant bits, so it is exact in fp16 and
bf16); the kernels multiply the fp32 accumulator by `scale_2 * 2**FOLD_EXP` once, in the epilogue.

Two decoders compute the same values: `bits` (portable Triton integer ops; the one the CPU interpreter runs)
and `asm` (PTX: byte permutes, one LOP3 and one packed bf16 FMA per pair of weights; SM80+, GPU only). The
kernels' `ASM` constexpr: 0 bits, 1 PTX, 2 PTX for a weight whose block scales are all normal E4M3 numbers
(`NVFP4Tensor.normal_scales`): each scale is then two integer ops instead of about seven with the subnormal case
and float conversions (sm_90 SASS of the 26B-A4B MoE and linear main loops: 7-17% fewer instructions, which the
mid-size MoE is bound by; scripts/cpu_sass_counts.py).

`load_weight_halves` / `load_act_halves` give the same tiles as two halves, even and odd K columns: a packed
byte's low and high nibbles stay apart (no interleave back into K order) and the activation tile, smaller at
decode sizes, is split instead; two MMAs of BK/2 sum the same products (H200 probe, sorted MoE: 4-5% faster at
16-64 tokens, 3% slower at 706; `MoEConfig.halves`, a tuner candidate).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The K-ordered PTX decode (`_DECODE_K_ORDER_PTX`) is opt-in (NVFP4KIT_K_ORDER_DECODE=1, read at import): unlike
# the elementwise decoders it relies on each instance getting four K-consecutive bytes (tests/kernels/
# test_decode_layout.py checks the compiled layouts on the CPU). On the H100 (session 14) it matched the bits
# decoder bitwise in every tensor-core kernel and sped the MoE up 5% (27.1 vs 28.6 us at one token), but broke
# the fp32 GEMV tile (now excluded, `expand_weight`); on by default once a whole engine has run with it
K_ORDER_DECODE = tl.constexpr(os.environ.get("NVFP4KIT_K_ORDER_DECODE", "0") == "1")

# power-of-two factor each decoder leaves in the expanded weight (undone in the epilogue)
BITS_FOLD_EXP = 7
ASM_FOLD_EXP = 62

# PTX for `decode_bytes`: four packed bytes ($6) and their four bf16 scales ($4, $5) give the low nibbles'
# weights ($0, $1) and the high nibbles' weights ($2, $3). PRMT puts two bytes at bits 8..15 of the two
# 16-bit lanes; a nibble at bits 12..15 of a lane is the bf16 e2m1 * 2**-126 once its magnitude bits move to
# 6..8 (shift, mask, LOP3); the scale, pre-multiplied by 2**64, lands it on e2m1 * scale * 2**-62 exactly
# (a normal bf16). 2 integer ops and half a packed FMA per weight.
_DECODE_PTX = tl.constexpr(
    """
{
.reg .b32 t, u, r, nz, sm, z;
mov.b32 nz, 0x80008000;
mov.b32 sm, 0x80008000;
mov.b32 z, 0;
prmt.b32 t, $6, z, 0x1404;
shr.b32 r, t, 6;
and.b32 r, r, 0x01C001C0;
lop3.b32 u, t, sm, r, 0xEA;
fma.rn.bf16x2 $2, u, $4, nz;
shl.b32 t, t, 4;
shr.b32 r, t, 6;
and.b32 r, r, 0x01C001C0;
lop3.b32 u, t, sm, r, 0xEA;
fma.rn.bf16x2 $0, u, $4, nz;
prmt.b32 t, $6, z, 0x3424;
shr.b32 r, t, 6;
and.b32 r, r, 0x01C001C0;
lop3.b32 u, t, sm, r, 0xEA;
fma.rn.bf16x2 $3, u, $5, nz;
shl.b32 t, t, 4;
shr.b32 r, t, 6;
and.b32 r, r, 0x01C001C0;
lop3.b32 u, t, sm, r, 0xEA;
fma.rn.bf16x2 $1, u, $5, nz;
}
"""
)


# PTX for `_decode` (K order): the same bit trick as `_DECODE_PTX`, four packed bytes ($6) giving their eight weights
# in K order, two a register ($0..$3: bytes 0, 1, 2, 3), so the MMA operand needs no interleave. Each PRMT puts a
# byte's low nibble (from the word shifted left by 4) at bits 12..15 of lane 0 and its high nibble at bits 28..31
# of lane 1; bytes 0-3 share one 16-weight block, so their scales are equal ($4, $5 hold it twice each). 2.6 integer
# ops and half a packed FMA per weight, no byte permutes after it.
def k_order_byte_ptx(byte: int, word: str, scale: str, out: str) -> str:
    """PTX lines decoding byte `byte` of the packed `word` register into the bf16x2 register `out` (its low then
    high nibble's weight, times `scale`, a bf16x2 * 2**64). Needs .b32 registers t, u, r, sm = 0x80008000 and
    q4 = word << 4 declared and set. PRMT: this byte of the word into lane 1 and of q4 (selector byte + 4) into
    lane 0."""
    return "\n".join([
        f"prmt.b32 t, {word}, q4, 0x{byte}{byte + 4}{byte + 4}{byte + 4};",
        "shr.b32 r, t, 6;",
        "and.b32 r, r, 0x01C001C0;",
        "lop3.b32 u, t, sm, r, 0xEA;",
        f"fma.rn.bf16x2 {out}, u, {scale}, sm;",
    ])  # fmt: skip


def _k_order_ptx() -> str:
    lines = [".reg .b32 q4, t, u, r, sm;", "mov.b32 sm, 0x80008000;", "shl.b32 q4, $6, 4;"]
    lines += [k_order_byte_ptx(byte, "$6", f"${4 + byte // 2}", f"${byte}") for byte in range(4)]
    return "\n{\n" + "\n".join(lines) + "\n}\n"


_DECODE_K_ORDER_PTX = tl.constexpr(_k_order_ptx())


@triton.jit
def decode_scale_fp16(s):
    """E4M3 bytes -> fp16 value * 2**7, exact (subnormal scales included)."""
    su = s.to(tl.uint16)
    normal = (((su & 0x7F) << 7) + (15 << 10)).to(tl.float16, bitcast=True)
    subnormal = (su & 0x07).to(tl.float16) * 0.25
    return tl.where((su & 0x78) == 0, subnormal, normal)


@triton.jit
def scale_operand(s, ASM: tl.constexpr):
    """E4M3 block-scale bytes -> what `decode_bytes` multiplies by, elementwise: ASM, bf16 * 2**64 (the PTX
    decoders' scale operand); portable, fp16 * 2**7. ASM == 2 (normal scales only): exponent and mantissa bits
    shift into bf16 places and the exponent field gains 184 = 127 - 7 + 64 (bf16 bias - E4M3 bias + the fold),
    exact for every nonzero exponent."""
    if ASM == 2:
        scale = (((s.to(tl.uint16) & 0x7F) << 4) + (184 << 7)).to(tl.bfloat16, bitcast=True)
    elif ASM:
        scale = (decode_scale_fp16(s).to(tl.float32) * 144115188075855872.0).to(tl.bfloat16)  # * 2**57
    else:
        scale = decode_scale_fp16(s)
    return scale


@triton.jit
def _scale_per_byte(s, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    """`scale_operand` of the [BN, BK/16] block scales, one per packed byte: [BN, BK/2]."""
    return tl.reshape(tl.broadcast_to(scale_operand(s, ASM)[:, :, None], [BN, BK // 16, 8]), [BN, BK // 2])


@triton.jit
def decode_bytes(b, scale, ASM: tl.constexpr):
    """Packed bytes and their scales (`scale_operand`, one per byte, same shape) -> (low nibbles = even K, high
    nibbles = odd K) weights. Portable: fp16 bit tricks, nibble -> e2m1 * 2**-14 (0.5 becomes an fp16
    subnormal), times scale * 2**7. ASM: `_DECODE_PTX`."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            _DECODE_PTX,
            "=r,=r,=r,=r,r,r,r",
            [scale, b],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
    else:
        bu = b.to(tl.uint16)
        lo = (((bu & 0x08) << 12) | ((bu & 0x07) << 9)).to(tl.float16, bitcast=True) * scale
        hi = (((bu & 0x80) << 8) | ((bu & 0x70) << 5)).to(tl.float16, bitcast=True) * scale
    return lo, hi


@triton.jit
def _decode_halves(b, s, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    """A raw tile's weights as (low nibbles = even K, high nibbles = odd K), [BN, BK/2] each (`decode_bytes`)."""
    return decode_bytes(b, _scale_per_byte(s, BN, BK, ASM), ASM)


@triton.jit
def _decode(b, s, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, K_ORDER: tl.constexpr):
    """A raw tile's weights in K order: [BN, BK]: the halves interleaved; with K_ORDER (and ASM), PTX's
    `_DECODE_K_ORDER_PTX`, whose two outputs hold each group of four bytes' first and last four weights (w0-3 and
    w4-7 of 8 a group), regrouped here without moving a 16-bit value between registers."""
    if ASM and K_ORDER:
        first, last = tl.inline_asm_elementwise(
            _DECODE_K_ORDER_PTX,
            "=r,=r,=r,=r,r,r,r",
            [_scale_per_byte(s, BN, BK, ASM), b],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
        groups = tl.join(tl.reshape(first, [BN, BK // 8, 4]), tl.reshape(last, [BN, BK // 8, 4]))
        return tl.reshape(tl.permute(groups, (0, 1, 3, 2)), [BN, BK])
    lo, hi = _decode_halves(b, s, BN, BK, ASM)
    return tl.reshape(tl.join(lo, hi), [BN, BK])


@triton.jit
def load_weight_raw(
    w_ptr,
    s_ptr,
    rows,
    k0,
    K,
    stride_wn,
    stride_sn,
    BK: tl.constexpr,
    NVFP4: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """The stored bytes of rows `rows` (clamped in range) x columns [k0, k0+BK): (codes, scales) for NVFP4,
    (values, values) for a dense weight. (Triton's software pipeliner overlaps these loads with the math.)"""
    if NVFP4:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        ks = k0 // 16 + tl.arange(0, BK // 16)
        b_ptrs = w_ptr + rows[:, None] * stride_wn + kb[None, :]
        s_ptrs = s_ptr + rows[:, None] * stride_sn + ks[None, :]
        if EVEN_K:
            b = tl.load(b_ptrs)
            s = tl.load(s_ptrs)
        else:
            b = tl.load(b_ptrs, mask=kb[None, :] < K // 2, other=0)
            s = tl.load(s_ptrs, mask=ks[None, :] < K // 16, other=0)
        return b, s
    else:
        k = k0 + tl.arange(0, BK)
        w_ptrs = w_ptr + rows[:, None] * stride_wn + k[None, :]
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k[None, :] < K, other=0.0)
        return w, w


@triton.jit
def expand_weight(
    b, s, BN: tl.constexpr, BK: tl.constexpr, NVFP4: tl.constexpr, ASM: tl.constexpr, DTYPE: tl.constexpr
):
    """Raw tile from `load_weight_raw` -> [BN, BK] in DTYPE (NVFP4: e2m1 * scale * 2**-FOLD, exactly). The
    K-ordered decode only for MMA operands (16-bit DTYPE): on the H100 (Triton 3.6) it gave wrong GEMV (fp32)
    results, whose byte tiles are not laid out four K-consecutive bytes a thread."""
    if NVFP4:
        w = _decode(b, s, BN, BK, ASM, K_ORDER_DECODE and DTYPE != tl.float32)
    else:
        w = b
    return w.to(DTYPE)


@triton.jit
def load_weight_tile(
    w_ptr,
    s_ptr,
    rows,
    k0,
    K,
    stride_wn,
    stride_sn,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NVFP4: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Load a weight tile and expand it (see `load_weight_raw`, `expand_weight`)."""
    b, s = load_weight_raw(w_ptr, s_ptr, rows, k0, K, stride_wn, stride_sn, BK, NVFP4, EVEN_K)
    return expand_weight(b, s, BN, BK, NVFP4, ASM, DTYPE)


@triton.jit
def load_weight_halves(
    w_ptr,
    s_ptr,
    rows,
    k0,
    K,
    stride_wn,
    stride_sn,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NVFP4: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """`load_weight_tile` as (even K columns, odd K columns), [BN, BK/2] each in DTYPE."""
    b, s = load_weight_raw(w_ptr, s_ptr, rows, k0, K, stride_wn, stride_sn, BK, NVFP4, EVEN_K)
    if NVFP4:
        even, odd = _decode_halves(b, s, BN, BK, ASM)
    else:
        even, odd = tl.split(tl.reshape(b, [BN, BK // 2, 2]))
    return even.to(DTYPE), odd.to(DTYPE)


@triton.jit
def load_act_halves(x_ptr, rows, row_ok, k0, K, stride_xm, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """`load_act_tile` as (even K columns, odd K columns)."""
    x = load_act_tile(x_ptr, rows, row_ok, k0, K, stride_xm, BK, EVEN_K)
    return tl.split(tl.reshape(x, [x.shape[0], BK // 2, 2]))


@triton.jit
def load_act_tile(x_ptr, rows, row_ok, k0, K, stride_xm, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """Activation rows (masked by `row_ok`) x columns [k0, k0+BK)."""
    k = k0 + tl.arange(0, BK)
    ptrs = x_ptr + rows[:, None] * stride_xm + k[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (k[None, :] < K), other=0.0)


@triton.jit
def mma(acc, a, b, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation (the CPU interpreter multiplies bf16 wrongly, so it upcasts)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def fold_scale(s2_ptr, index, NVFP4: tl.constexpr, ASM: tl.constexpr):
    """The epilogue factor: scale_2 times the power of two the decoder left out; 1 for dense weights."""
    if NVFP4:
        s2 = tl.load(s2_ptr + index).to(tl.float32)
        if ASM:
            return s2 * 4611686018427387904.0  # 2**62
        return s2 * 128.0  # 2**7
    return 1.0
