"""q/k/v from the fused qkv projection in one launch: per-head RMSNorm, RoPE on q and k, weightless norm on v.

One program handles one (token, head): it loads the head's two halves (RoPE pairs are (i, i + D/2)),
normalises them in fp32, rotates by angle = position * inv_freq[i] computed in the kernel (no cos/sin tables;
proportional RoPE has inv_freq 0 on its pass-through pairs, which rotate by nothing), and writes q, k or v.
Layers without a v projection (k_eq_v) take v from the raw k columns. The reference is the torch backend's
`qkv_norm_rope` on fp32 inputs; no host syncs, so the op replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.kv_write import KVSink, encode_kv, format_constants, kernel_view
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.rope_angles import cos_sin


@triton.jit
def _norm_rope_head(
    src_ptr,
    w_ptr,
    dst_ptr,
    freq_ptr,
    pos,
    eps,
    HALF,
    HAS_WEIGHT: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_HALF)
    ok = cols < HALF
    x1 = tl.load(src_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
    x1 *= inv_rms
    x2 *= inv_rms
    if HAS_WEIGHT:
        x1 *= tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        x2 *= tl.load(w_ptr + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        freq = tl.load(freq_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        cos, sin = cos_sin(pos * freq, True)  # libdevice's: a few per head, and q / stored K as before
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    dtype = dst_ptr.dtype.element_ty
    x1, x2 = x1.to(dtype), x2.to(dtype)
    tl.store(dst_ptr + cols, x1, mask=ok)
    tl.store(dst_ptr + HALF + cols, x2, mask=ok)
    return x1, x2


@triton.jit
def _store_to_pool(
    pool_ptr, x1, x2, slot, scale, HALF, BLOCK_HALF: tl.constexpr, FORMAT: tl.constexpr, MAN: tl.constexpr,
    BIAS: tl.constexpr, MAX_VALUE: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr,
):  # fmt: skip
    """A head's two halves into its pool row (`pool_ptr` at the row's head), as `kv_write` would store them."""
    cols = tl.arange(0, BLOCK_HALF)
    ok = cols < tl.where(slot >= 0, HALF, 0)
    dtype = pool_ptr.dtype.element_ty
    tl.store(
        pool_ptr + cols,
        encode_kv(x1, scale, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL, SUB_SCALE, dtype),
        mask=ok,
    )
    tl.store(
        pool_ptr + HALF + cols, encode_kv(x2, scale, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL, SUB_SCALE, dtype),
        mask=ok,
    )  # fmt: skip


# a step's metadata rows (one scalar load per program) and the K/V scales stay runtime values
@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr", "k_scale", "v_scale"])
def _qkv_norm_rope_kernel(
    qkv_ptr, pos_ptr, freq_ptr, q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr,
    slot_ptr, k_pool, v_pool, k_scale, v_scale, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_qkv, num_heads, num_kv_heads, v_col, eps, HALF,
    BLOCK_HALF: tl.constexpr, SINK: tl.constexpr, K_POOL: tl.constexpr, FORMAT: tl.constexpr, MAN: tl.constexpr,
    BIAS: tl.constexpr, MAX_VALUE: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = 2 * HALF
    pos = tl.load(pos_ptr + token).to(tl.float32)
    row = qkv_ptr + token * stride_qkv
    if head < num_heads:
        dst = q_ptr + (token * num_heads + head) * d
        _norm_rope_head(row + head * d, q_norm_ptr, dst, freq_ptr, pos, eps, HALF, True, True, BLOCK_HALF)
    elif head < num_heads + num_kv_heads:
        j = head - num_heads
        dst = k_ptr + (token * num_kv_heads + j) * d
        src = row + num_heads * d + j * d
        x1, x2 = _norm_rope_head(src, k_norm_ptr, dst, freq_ptr, pos, eps, HALF, True, True, BLOCK_HALF)
        if SINK and K_POOL:  # the KV write fused in: no second launch reads k back
            slot = tl.load(slot_ptr + token)
            pool = k_pool + tl.maximum(slot, 0) * stride_ks + j * stride_kh
            _store_to_pool(pool, x1, x2, slot, k_scale, HALF, BLOCK_HALF, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL,
                           SUB_SCALE)  # fmt: skip
    else:
        j = head - num_heads - num_kv_heads
        dst = v_ptr + (token * num_kv_heads + j) * d
        x1, x2 = _norm_rope_head(
            row + v_col + j * d, k_norm_ptr, dst, freq_ptr, pos, eps, HALF, False, False, BLOCK_HALF
        )
        if SINK:
            slot = tl.load(slot_ptr + token)
            pool = v_pool + tl.maximum(slot, 0) * stride_vs + j * stride_vh
            _store_to_pool(pool, x1, x2, slot, v_scale, HALF, BLOCK_HALF, FORMAT, MAN, BIAS, MAX_VALUE, MIN_NORMAL,
                           SUB_SCALE)  # fmt: skip


def qkv_norm_rope(
    qkv: torch.Tensor,
    *,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    v_proj: bool,
    eps: float,
    kv_sink: KVSink | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q [T, heads, D], k and v [T, kv_heads, D] (None when k_norm is None: the layer computes no K/V).
    `kv_sink`: also store k and v in the KV pools, as `kv_write.write_kv` would (the same bytes)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    computes_kv = k_norm is not None
    kv_size = num_kv_heads * head_dim if computes_kv else 0
    width = num_heads * head_dim + kv_size * (2 if computes_kv and v_proj else 1)
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv has shape {tuple(qkv.shape)}, expected [T, {width}] for these heads")
    t = qkv.shape[0]
    if positions.shape != (t,):
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected ({t},)")
    half = head_dim // 2
    for name, vec, size in (("inv_freq", inv_freq, half), ("q_norm", q_norm, head_dim)):
        if vec.numel() != size:
            raise ValueError(f"{name} has {vec.numel()} entries, expected {size}")
    if computes_kv and k_norm.numel() != head_dim:
        raise ValueError(f"k_norm has {k_norm.numel()} entries, expected {head_dim}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = v = None
    if computes_kv:
        k = torch.empty((t, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
    if t:
        q_size = num_heads * head_dim
        v_col = q_size + kv_size if v_proj else q_size  # without v_proj, v normalises the raw k
        heads = num_heads + (2 * num_kv_heads if computes_kv else 0)
        block_half = triton.next_power_of_2(half)
        sink = _sink_args(kv_sink, t, num_kv_heads, head_dim) if computes_kv and kv_sink is not None else None
        slots, k_pool, v_pool, k_scale, v_scale, pool_strides, pool_consts = sink or (
            positions,
            q,
            q,
            1.0,
            1.0,
            (0, 0, 0, 0),
            dict(format_constants(q), K_POOL=False),
        )
        _qkv_norm_rope_kernel[(t, heads)](
            qkv, positions, inv_freq.contiguous(), q_norm.contiguous(),
            q_norm if k_norm is None else k_norm.contiguous(), q, q if k is None else k, q if v is None else v,
            slots, k_pool, v_pool, k_scale, v_scale, *pool_strides,
            qkv.stride(0), num_heads, num_kv_heads if computes_kv else 0, v_col, float(eps), half,
            BLOCK_HALF=block_half, SINK=sink is not None, **pool_consts,
            num_warps=max(1, min(4, block_half // 64)), **pdl_args(qkv.device),
        )  # fmt: skip
    return q, k, v


def _sink_args(sink: KVSink, tokens: int, kv_heads: int, head_dim: int) -> tuple:
    """The kernel's pool arguments for `sink`, checked as `write_kv` checks them."""
    v_pool = kernel_view(sink.v_store)
    k_pool = v_pool if sink.k_store is None else kernel_view(sink.k_store)
    if sink.v_store.shape[1:] != (kv_heads, head_dim) or sink.slots.shape != (tokens,):
        raise ValueError(f"a KV sink of rows {tuple(sink.v_store.shape[1:])} and {tuple(sink.slots.shape)} slots "
                         f"does not take {tokens} tokens of {kv_heads} x {head_dim}")  # fmt: skip
    if sink.k_store is not None and sink.k_store.dtype != sink.v_store.dtype:
        raise ValueError("the K and V pools of a sink must have the same dtype")
    strides = (k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1))
    consts = dict(format_constants(sink.v_store), K_POOL=sink.k_store is not None)
    return sink.slots, k_pool, v_pool, float(sink.k_scale), float(sink.v_scale), strides, consts
