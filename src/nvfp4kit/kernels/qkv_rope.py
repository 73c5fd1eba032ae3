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
        cos, sin = cos_sin(pos * freq)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    dtype = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + cols, x1.to(dtype), mask=ok)
    tl.store(dst_ptr + HALF + cols, x2.to(dtype), mask=ok)


@triton.jit(do_not_specialize=["pos_ptr"])  # a step's metadata row (one scalar load per program)
def _qkv_norm_rope_kernel(
    qkv_ptr,
    pos_ptr,
    freq_ptr,
    q_norm_ptr,
    k_norm_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    stride_qkv,
    num_heads,
    num_kv_heads,
    v_col,
    eps,
    HALF,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
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
        _norm_rope_head(src, k_norm_ptr, dst, freq_ptr, pos, eps, HALF, True, True, BLOCK_HALF)
    else:
        j = head - num_heads - num_kv_heads
        dst = v_ptr + (token * num_kv_heads + j) * d
        _norm_rope_head(
            row + v_col + j * d, k_norm_ptr, dst, freq_ptr, pos, eps, HALF, False, False, BLOCK_HALF
        )


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q [T, heads, D], k and v [T, kv_heads, D] (None when k_norm is None: the layer computes no K/V)."""
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
        _qkv_norm_rope_kernel[(t, heads)](
            qkv,
            positions,
            inv_freq.contiguous(),
            q_norm.contiguous(),
            q_norm if k_norm is None else k_norm.contiguous(),
            q,
            q if k is None else k,
            q if v is None else v,
            qkv.stride(0),
            num_heads,
            num_kv_heads if computes_kv else 0,
            v_col,
            float(eps),
            half,
            BLOCK_HALF=block_half,
            num_warps=max(1, min(4, block_half // 64)),
            **pdl_args(qkv.device),
        )
    return q, k, v
