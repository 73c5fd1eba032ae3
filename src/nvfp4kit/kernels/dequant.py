"""NVFP4 -> dense expansion for prefill-sized GEMMs, and the per-device scratch buffer it writes into.

At prefill sizes a W4A16 GEMM is compute-bound, and cuBLAS on BF16 weights beats a Triton mainloop that has to
decode FP4 tiles in registers before every MMA. So for M at or above a threshold the linear expands its weight
once into a BF16 scratch tile (reads N*K/2 + N*K/16 bytes, writes 2*N*K) and hands the product to cuBLAS. The
scratch is one buffer per (device, dtype), grown to the largest request and reused by every layer: all users
run on one stream, so the caching allocator and stream order keep a buffer from being overwritten while a GEMM
still reads it. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import interpreting, kernel_capability
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import expand_weight, fold_scale, load_weight_raw

# (rows, columns, warps) expanded per program. `scripts/gpu_expand_tiles.py` on an H100 (copy 2,986 GB/s): the
# 26B-A4B linears expand at 2.4-3.0 TB/s with every tile tried; 16 x 512 (256 contiguous bytes a row) is within 5%
# of the best on each and the all-expert MoE expansion (the grouped prefill path) takes 503 us instead of 616 with
# the earlier 32 x 128
EXPAND_TILE = (16, 512, 4)

_scratch: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}


@triton.jit
def _round_to_bf16_grid(w):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32: the CPU interpreter's cast truncates."""
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    row0,
    rows,
    K,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_oe,
    stride_on,
    BR: tl.constexpr,
    BK: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    e = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    k0 = tl.program_id(2) * BK
    src_rows = row0 + tl.minimum(r, rows - 1)  # clamped: tail rows load a valid row and are not stored
    b, s = load_weight_raw(
        w_ptr + e * stride_we, s_ptr + e * stride_se, src_rows, k0, K, stride_wn, stride_sn, BK, True, EVEN_K
    )
    w = expand_weight(b, s, BR, BK, True, ASM, tl.float32) * fold_scale(s2_ptr, e, True, ASM)
    if ROUND_BF16:
        w = _round_to_bf16_grid(w)
    k = k0 + tl.arange(0, BK)
    mask = (r[:, None] < rows) & (k[None, :] < K)
    dst = out_ptr + e * stride_oe + r[:, None] * stride_on + k[None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nvfp4(
    weight: NVFP4Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Expand a [N, K] or stacked [E, N, K] NVFP4 weight to `dtype` (each value rounded once from fp32).

    `rows=(start, count)` expands only rows [start, start+count) of each matrix (e.g. the gate half of a fused
    gate_up); `out`, if given, must be contiguous of the result's shape and dtype and is written in place;
    `tile` = (rows, columns, warps) per program (powers of two, columns >= 32; default `EXPAND_TILE`)."""
    stacked = weight.packed.dim() == 3
    packed, scale, s2 = weight.kernel_operands(stacked=True)  # a single matrix as a stack of one
    experts, n, half_k = packed.shape
    k = 2 * half_k
    start, count = rows if rows is not None else (0, n)
    if start < 0 or count < 0 or start + count > n:
        raise ValueError(f"rows {rows} outside the weight's {n} rows")
    if s2.numel() != experts:
        raise ValueError(f"{experts} matrices need {experts} scale_2 values, got {s2.numel()}")
    shape = (experts, count, k) if stacked else (count, k)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    interpret = interpreting()
    capability = kernel_capability(packed.device)
    asm = int(not interpret and capability is not None and capability >= (8, 0) and dtype != torch.float16)
    block_rows, block_k, warps = tile or EXPAND_TILE
    grid = (experts, triton.cdiv(count, block_rows), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        packed, scale, s2, out, start, count, k,
        packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), count * k, k,
        BR=block_rows, BK=block_k, ASM=asm, EVEN_K=k % block_k == 0, **pdl_args(packed.device),
        ROUND_BF16=interpret and dtype == torch.bfloat16, num_warps=warps,
    )  # fmt: skip
    return out


def scratch(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous view of `shape` on the reused per-device buffer (grown when a larger view is asked for).

    Every view aliases the same memory: a caller must be done with one view (in stream order) before the
    next `scratch` call's user writes it."""
    numel = 1
    for size in shape:
        numel *= size
    key = (device.type, -1 if device.index is None else device.index, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)  # let the allocator reuse the old block for the new one
        buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def scratch_bytes() -> int:
    """Bytes the scratch buffers hold now (all devices and dtypes)."""
    return sum(buf.numel() * buf.element_size() for buf in _scratch.values())


def scratch_buffers() -> list[torch.Tensor]:
    """The scratch buffers held now. A CUDA graph that captured views of them keeps these alive: a later, larger
    `scratch` call replaces a buffer, and a replay must not write into memory the allocator gave to others."""
    return list(_scratch.values())


def release_scratch() -> None:
    """Drop the scratch buffers (the next prefill-sized call allocates again)."""
    _scratch.clear()


def dequant_linear(x2: torch.Tensor, weight: NVFP4Tensor) -> torch.Tensor:
    """x2 [M, K] @ dequant(weight [N, K])^T through a dense scratch copy of the weight and torch (cuBLAS)."""
    n, k = weight.shape
    dense = dequantize_nvfp4(weight, dtype=x2.dtype, out=scratch(x2.device, x2.dtype, (n, k)))
    return torch.nn.functional.linear(x2, dense)
