"""Writing a step's K/V rows into the KV pools (the attention kernels read them back, see paged_attention.py).

Pools hold BF16/FP32 or FP8 (E4M3FN / E5M2) with a per-tensor scale: stored = x / scale, read = stored * scale.
FP8 is encoded with integer bit operations rather than Triton's fp8 types, so the same kernel runs on SM80 (where
Triton refuses `float8e4nv`) as on Hopper, and under the CPU interpreter. Encoding rounds to nearest
even like torch's `.to(float8_*)`; values beyond the format's range saturate to its largest finite value
(torch would give NaN for E4M3FN).

One launch per layer writes K and V of every token (V only for k_eq_v layers that store the shared tensor once);
a negative slot skips the token (padding rows of a fixed-size batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs


@dataclass(frozen=True)
class KVFormat:
    """How a pool's bytes encode values: 0 = the store's own float dtype, 1 = FP8 E4M3FN, 2 = FP8 E5M2,
    3 = BF16 written through its bit pattern (round to nearest even everywhere; the CPU interpreter truncates)."""

    code: int
    mantissa_bits: int = 0
    exponent_bias: int = 0
    max_value: float = 0.0

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.exponent_bias)

    @property
    def subnormal_scale(self) -> float:
        """1 / the spacing of subnormals."""
        return 2.0 ** (self.exponent_bias - 1 + self.mantissa_bits)


_FORMATS = {
    torch.float8_e4m3fn: KVFormat(1, mantissa_bits=3, exponent_bias=7, max_value=448.0),
    torch.float8_e5m2: KVFormat(2, mantissa_bits=2, exponent_bias=15, max_value=57344.0),
    torch.bfloat16: KVFormat(3),
    torch.float16: KVFormat(0),
    torch.float32: KVFormat(0),
}


def kv_format(store: torch.Tensor) -> KVFormat:
    if store.dtype not in _FORMATS:
        raise ValueError(
            f"KV pool dtype {store.dtype} is not supported; use bf16, fp16, fp32 or fp8 e4m3/e5m2"
        )
    return _FORMATS[store.dtype]


def kernel_view(store: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels address: FP8 pools as raw bytes."""
    code = kv_format(store).code
    if code == 3:
        return store.view(torch.int16)
    return store.view(torch.uint8) if code else store


@triton.jit
def encode_bf16(x):
    """fp32 -> BF16 bit pattern (int16), round to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16)


@triton.jit
def encode_fp8(
    x,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB_SCALE: tl.constexpr,
):
    """fp32 -> FP8 byte, round to nearest even, saturating."""
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.minimum(tl.abs(x), MAX_VALUE)
    abits = a.to(tl.int32, bitcast=True)
    lsb = (abits >> (23 - MAN)) & 1
    normal = ((abits + ((1 << (22 - MAN)) - 1) + lsb) >> (23 - MAN)) - ((127 - BIAS) << MAN)
    # subnormals are whole multiples of 1 / SUB_SCALE; adding and removing 2^23 rounds half to even
    sub = ((a * SUB_SCALE + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < MIN_NORMAL, sub, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def encode_kv(
    x, scale, FORMAT: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MAX_VALUE: tl.constexpr,
    MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr, store_dtype,
):  # fmt: skip
    """Values (already rounded to the activation dtype) as a pool stores them: x / scale in its format."""
    x = x.to(tl.float32) / scale
    if FORMAT == 0:
        return x.to(store_dtype)
    elif FORMAT == 3:
        return encode_bf16(x)
    else:
        return encode_fp8(x, MAN, BIAS, MAX_VALUE, MIN_NORMAL, SUB_SCALE)


@dataclass(frozen=True)
class KVSink:
    """Where a layer's K/V rows go when the kernel that computes them also stores them (`qkv_norm_rope`):
    pool rows `slots` [T] (negative: skip the token) of `v_store` (and `k_store`; None for a pool that keeps V
    only), with their scales."""

    slots: torch.Tensor
    v_store: torch.Tensor
    k_store: torch.Tensor | None
    v_scale: float = 1.0
    k_scale: float = 1.0


@triton.jit
def decode_e4m3(raw):
    """E4M3 bytes (as uint16) -> fp16 of value / 256, exact: the bits move into fp16's fields (bias 15 vs 7), so
    subnormals stay exact too and no FP8 hardware is needed (SM80). The caller applies the 256."""
    return (((raw & 0x80) << 8) | ((raw & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit(do_not_specialize=["slot_ptr"])  # a metadata row at 8 x T bytes: its alignment varies by step
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    slot_ptr,
    k_store,
    v_store,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ks,
    stride_kh_store,
    stride_vs,
    stride_vh_store,
    HAS_K: tl.constexpr,
    D: tl.constexpr,
    FORMAT: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, D)
    keep = cols < tl.where(slot >= 0, D, 0)
    slot = tl.maximum(slot, 0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + cols)
    v_out = encode_kv(
        v, v_scale, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL, SUB_SCALE, v_store.dtype.element_ty
    )
    tl.store(v_store + slot * stride_vs + h * stride_vh_store + cols, v_out, mask=keep)
    if HAS_K:
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + cols)
        k_out = encode_kv(
            k, k_scale, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL, SUB_SCALE, k_store.dtype.element_ty
        )
        tl.store(k_store + slot * stride_ks + h * stride_kh_store + cols, k_out, mask=keep)


def format_constants(store: torch.Tensor) -> dict:
    """The encode constants of a pool's format, as the kernels' constexpr keywords."""
    fmt = kv_format(store)
    return dict(FORMAT=fmt.code, MAN=fmt.mantissa_bits, BIAS=fmt.exponent_bias, MAX_VALUE=fmt.max_value,
                MIN_NORMAL=fmt.min_normal, SUB_SCALE=fmt.subnormal_scale)  # fmt: skip


def write_kv(
    v: torch.Tensor,
    *,
    k: torch.Tensor | None,
    slots: torch.Tensor,
    v_store: torch.Tensor,
    k_store: torch.Tensor | None,
    v_scale: float = 1.0,
    k_scale: float = 1.0,
) -> None:
    """Store v (and k) [T, Hkv, D] at pool rows `slots` [T] (int64; negative = skip), converting to the pool's
    dtype with its scale. `k` and `k_store` go together: both None for layers that keep V only."""
    if (k is None) != (k_store is None):
        raise ValueError("write_kv needs k and k_store together (both None for a V-only pool)")
    tokens, heads, head_dim = v.shape
    if v_store.shape[1:] != (heads, head_dim):
        raise ValueError(f"v {tuple(v.shape)} does not fit a pool of rows {tuple(v_store.shape[1:])}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two")
    if slots.shape != (tokens,):
        raise ValueError(f"slots has shape {tuple(slots.shape)}, expected ({tokens},)")
    if tokens == 0:
        return
    if k is not None and (k.shape != v.shape or k_store.dtype != v_store.dtype):
        raise ValueError("k and v (and their pools) must have the same shape and dtype")
    v = v if v.stride(-1) == 1 else v.contiguous()
    k_arg = v if k is None else (k if k.stride(-1) == 1 else k.contiguous())
    vs = kernel_view(v_store)
    ks = vs if k_store is None else kernel_view(k_store)
    _kv_write_kernel[(tokens, heads)](
        k_arg, v, slots, ks, vs, float(k_scale), float(v_scale),
        k_arg.stride(0), k_arg.stride(1), v.stride(0), v.stride(1),
        ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1),
        HAS_K=k is not None, D=head_dim, **format_constants(v_store), num_warps=1 if head_dim <= 256 else 2,
        **pdl_args(v.device),
    )  # fmt: skip
