"""W8A16 linear for the optional FP8 lm_head: y = x @ (W_fp8 * row_scale)^T, BF16/FP16 x, fp32 accumulation.

Tensor-core tiles over the vocabulary for M > 1 (N = 262,144 gives thousands of programs, so no split-K), and a
CUDA-core GEMV for batch-1 decode on cards without FP8 conversions (SM80), where a 16-row MMA tile would waste most
of its work. On SM89+ the E4M3 bytes are converted by the hardware (two per instruction) and the tiles take M = 1
too; on SM80 they become fp16 through their bit pattern (value / 256, exact, integer ops only), and the 256 is
applied with the row scale, once per output.
Reference: `FP8RowTensor.dequantize` + matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.fp8_rows import FP8RowTensor
from nvfp4kit.kernels.attention_pools import native_fp8_supported
from nvfp4kit.kernels.configs import interpreting, kernel_capability
from nvfp4kit.kernels.kv_write import decode_e4m3
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

# Without hardware FP8 conversion batch-1 decode takes the CUDA-core GEMV (H100, integer decode: 340 us vs 490-835
# us for tiles at M=2-4). With it the tiles win at M=1 too (H200: 189 us at M=2-16, 3.9 TB/s, vs 238-297 us for
# the best GEMV tiles; BF16 cuBLAS 346 us), so the GEMV is only the SM80 path.
GEMV_MAX_M = 1


@triton.jit
def _expand_e4m3(raw, NATIVE_FP8: tl.constexpr):
    """E4M3 bytes -> fp16: the value itself on the hardware path, value / 256 on the integer path."""
    if NATIVE_FP8:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return decode_e4m3(raw.to(tl.uint16))


@triton.jit(do_not_specialize=["M"])  # the token count varies by step: no variant per class of it
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr, NATIVE_FP8: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < N
    ct = tl.float32 if FP32 else x_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = k0 + rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        raw = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :],
                      mask=n_ok[:, None] & k_ok[None, :], other=0)  # fmt: skip
        w = _expand_e4m3(raw, NATIVE_FP8)
        if FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x.to(ct), tl.trans(w.to(ct)))
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0) * (1.0 if NATIVE_FP8 else 256.0)
    y = acc * scale[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _w8a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = k0 + rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        raw = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :],
                      mask=n_ok[:, None] & k_ok[None, :], other=0)  # fmt: skip
        w = decode_e4m3(raw.to(tl.uint16)).to(tl.float32)
        acc += w[None, :, :] * x[:, None, :]
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0) * 256.0
    y = tl.sum(acc, axis=2) * scale[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


def w8a16_linear(x: torch.Tensor, weight: FP8RowTensor) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) times an FP8 row-scaled weight [N, K] -> [..., N] in x.dtype."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if kernel_capability(x.device) is None and not interpreting():
        raise RuntimeError("the W8A16 kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    native = native_fp8_supported(x.device)
    data = weight.data.view(torch.uint8)
    if m <= GEMV_MAX_M and not native:
        bm = triton.next_power_of_2(m)
        bn, bk = (32, 256 // bm) if not interpreting() else (16, 32)
        _w8a16_gemv_kernel[(triton.cdiv(n, bn),)](
            flat, data, weight.scale, out, m, n, k, flat.stride(0), data.stride(0), out.stride(0),
            BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=3, **pdl_args(x.device),
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], n)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn, bk = (128, 128) if not interpreting() else (16, 32)
    fp32 = x.dtype == torch.float32 or interpreting()  # the interpreter's bf16 dot is wrong (Triton 3.9)
    _w8a16_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        flat, data, weight.scale, out, m, n, k, flat.stride(0), data.stride(0), out.stride(0),
        BM=bm, BN=bn, BK=bk, FP32=fp32, NATIVE_FP8=native, num_warps=4, num_stages=4, **pdl_args(x.device),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)
