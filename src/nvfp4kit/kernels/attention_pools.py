"""How the attention kernels see a KV pool: argument checks, storage views, the dot dtype and K derivation.

Shared by `paged_attention.py` (decode) and `prefill_attention.py` (prefill chunks). K/V tiles go into the dots
in their storage units: BF16 pools as bf16, FP8 pools as fp16 (exact; hardware conversion on SM89+, integer bit
operations on SM80 and in the interpreter); the per-tensor scales multiply the scores and the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.attention_launch import next_pow2
from nvfp4kit.kernels.configs import interpreting, kernel_capability
from nvfp4kit.kernels.kv_write import decode_e4m3, kernel_view, kv_format
from nvfp4kit.kernels.rope_angles import cos_sin


@dataclass(frozen=True)
class DerivedKey:
    """K = rope(V * k_norm_weight) for layers that store V only; inv_freq is zero past `rotary_pairs`."""

    k_norm_weight: torch.Tensor  # [D]
    inv_freq: torch.Tensor  # [D/2] fp32
    rotary_pairs: int


def native_fp8_supported(device: torch.device) -> bool:
    """Hardware FP8 conversions (SM89+) that Triton accepts; elsewhere FP8 is decoded with integer ops."""
    capability = kernel_capability(device)
    return capability is not None and not interpreting() and capability >= (8, 9)


def dot_dtype_code(q_dtype: torch.dtype, kv_format_code: int) -> int:
    """Dot dtype: 0 fp32, 1 bf16, 2 fp16. FP8 pools are read as fp16 (exact), BF16 pools as bf16; fp32 models and
    the CPU interpreter (whose bf16 dot is wrong in Triton 3.9) use fp32."""
    if interpreting() or q_dtype == torch.float32:
        return 0
    if kv_format_code in (1, 2):
        return 2
    return 1 if kv_format_code == 3 else (2 if q_dtype == torch.float16 else 1)


def check_attention_args(
    q: torch.Tensor, v_store: torch.Tensor, k_store: torch.Tensor | None, derived_key: DerivedKey | None,
    ring_size: int | None, block_size: int | None,
) -> tuple[int, int, int, int]:  # fmt: skip
    """The argument checks both attention kernels share; returns (tokens, q_heads, kv_heads, head_dim)."""
    if (ring_size is None) == (block_size is None):
        raise ValueError("give exactly one of ring_size (sliding ring) or block_size (paged pool)")
    if (k_store is None) == (derived_key is None):
        raise ValueError("give k_store, or derived_key for a pool that stores V only (not both)")
    tokens, q_heads, head_dim = q.shape
    kv_heads = v_store.shape[1]
    if v_store.shape[2] != head_dim or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(
            f"head_dim {head_dim} must be a power of two >= 16 and match the pool {tuple(v_store.shape)}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last dim")
    if kernel_capability(q.device) is None and not interpreting():
        raise RuntimeError(
            "the Triton attention kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)"
        )
    return tokens, q_heads, kv_heads, head_dim


@dataclass(frozen=True)
class PoolOperands:
    """A pool as the kernels read it: storage views, the unit factor and the derived-K tensors."""

    v_view: torch.Tensor
    k_view: torch.Tensor
    unit: float  # storage units -> values (with the per-tensor scale)
    native_fp8: bool
    rot: int  # rotated columns of derived K (1 when K is stored)
    knorm: torch.Tensor
    inv_freq: torch.Tensor


def pool_operands(
    q: torch.Tensor, v_store: torch.Tensor, k_store: torch.Tensor | None, derived_key: DerivedKey | None
) -> PoolOperands:
    head_dim = q.shape[-1]
    fmt = kv_format(v_store)
    rot = 0
    knorm = inv_freq = q  # unused placeholders when K is stored
    if derived_key is not None:
        min_rot = 1 if interpreting() else 16
        rot = min(head_dim // 2, max(min_rot, next_pow2(derived_key.rotary_pairs)))
        knorm, inv_freq = derived_key.k_norm_weight, derived_key.inv_freq.float()
    native_fp8 = fmt.code in (1, 2) and native_fp8_supported(q.device)
    v_view = v_store if native_fp8 else kernel_view(v_store)
    k_view = v_view if k_store is None else (k_store if native_fp8 else kernel_view(k_store))
    # storage units -> values: the per-tensor scale, and 2^8 for E4M3 read through fp16 bit patterns
    unit = 256.0 if fmt.code == 1 and not native_fp8 else 1.0
    return PoolOperands(v_view, k_view, unit, native_fp8, max(rot, 1), knorm, inv_freq)


@triton.jit
def load_kv_tile(ptrs, mask, FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr, CT: tl.constexpr):
    """A K/V tile in the dot dtype CT, in storage units: FP8 E4M3 through its fp16 bit pattern is value / 256
    (the factor is applied to the scores and the output, never per element)."""
    if NATIVE_FP8:  # an fp8 load cannot take an integer fill value: zero masked rows after converting
        x = tl.where(mask, _stored_to_float(tl.load(ptrs, mask=mask), FORMAT, NATIVE_FP8), 0.0)
    else:
        x = _stored_to_float(tl.load(ptrs, mask=mask, other=0), FORMAT, NATIVE_FP8)
    return x.to(CT)


@triton.jit
def load_kv_tile_unmasked(ptrs, FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr, CT: tl.constexpr):
    """`load_kv_tile` unmasked, for a K or V tile whose rows past the keys repeat the last key's slot: those rows
    are finite (this sequence's own values) and their scores become -inf, so neither the load's mask nor the
    select that zeroes masked rows is needed (sm_90 sliding decode over FP8: the loop 864 -> 629 instructions)."""
    return _stored_to_float(tl.load(ptrs), FORMAT, NATIVE_FP8).to(CT)


@triton.jit
def _stored_to_float(raw, FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """Stored K/V values as a float tensor (fp16 for FP8 pools, in storage units; bf16 / fp32 pools as stored)."""
    if FORMAT == 3:
        x = raw.to(tl.bfloat16, bitcast=True)
    elif FORMAT == 1:
        if NATIVE_FP8:
            x = raw.to(tl.float16)
        else:
            x = decode_e4m3(raw.to(tl.uint16))
    elif FORMAT == 2:
        if NATIVE_FP8:
            x = raw.to(tl.float16)
        else:
            x = (raw.to(tl.uint16) << 8).to(tl.float16, bitcast=True)
    else:
        x = raw
    return x


@triton.jit
def derived_key_queries(q, q_ptr, q_rows, row_ok, knorm_ptr, inv_freq_ptr, D: tl.constexpr, ROT: tl.constexpr,
                        CT: tl.constexpr):  # fmt: skip
    """For K = rope(V * w_k) (k_eq_v layers): scores = (q w).V over the pass-through columns, so k_norm's weight is
    folded into q once; returns that q, the rotated halves of q, their weights and the RoPE frequencies."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, D)
    rcols = tl.arange(0, ROT)
    w = tl.load(knorm_ptr + cols).to(tl.float32)
    q = tl.where(((cols % HALF) < ROT)[None, :], 0.0, q * w[None, :]).to(CT)
    q_r1 = tl.load(q_ptr + q_rows[:, None] + rcols[None, :], mask=row_ok[:, None], other=0.0).to(CT)
    q_r2 = tl.load(q_ptr + q_rows[:, None] + HALF + rcols[None, :], mask=row_ok[:, None], other=0.0).to(CT)
    w_r1 = tl.load(knorm_ptr + rcols).to(tl.float32)
    w_r2 = tl.load(knorm_ptr + HALF + rcols).to(tl.float32)
    freq = tl.load(inv_freq_ptr + rcols).to(tl.float32)
    return q, q_r1, q_r2, w_r1, w_r2, freq


@triton.jit
def rotated_key_columns(v_rows, k_ok, k_pos, w_r1, w_r2, freq, D: tl.constexpr, ROT: tl.constexpr,
                        FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr, PRECISE: tl.constexpr):  # fmt: skip
    """The rotated columns of derived K for a key tile, fp32 in storage units: rope(x * w) at the keys'
    positions, as two [keys, ROT] halves (the pairs' first and second members). PRECISE: for fp32 dots."""
    HALF: tl.constexpr = D // 2
    rcols = tl.arange(0, ROT)
    x1 = load_kv_tile(v_rows[:, None] + rcols[None, :], k_ok[:, None], FORMAT, NATIVE_FP8, tl.float32)
    x2 = load_kv_tile(v_rows[:, None] + HALF + rcols[None, :], k_ok[:, None], FORMAT, NATIVE_FP8, tl.float32)
    x1 = x1 * w_r1[None, :]
    x2 = x2 * w_r2[None, :]
    cos, sin = cos_sin(k_pos.to(tl.float32)[:, None] * freq[None, :], PRECISE)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def rotated_key_scores(q_r1, q_r2, w_r1, w_r2, freq, v_rows, k_ok, k_pos, D: tl.constexpr, ROT: tl.constexpr,
                       FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr, CT: tl.constexpr,
                       PRECISION: tl.constexpr):  # fmt: skip
    """The rotated columns' share of the scores for a key tile whose K is derived from the stored V: two small
    dots over rope(x * w) with the angles of the keys' positions."""
    k1, k2 = rotated_key_columns(
        v_rows, k_ok, k_pos, w_r1, w_r2, freq, D, ROT, FORMAT, NATIVE_FP8, CT == tl.float32
    )
    scores = tl.dot(q_r1, tl.trans(k1.to(CT)), input_precision=PRECISION)
    return scores + tl.dot(q_r2, tl.trans(k2.to(CT)), input_precision=PRECISION)
