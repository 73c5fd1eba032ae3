"""Whether `tl.dot(..., input_precision="ieee")` on fp32 tiles is exact on this GPU (probe for the fp32 prefill
attention error: 2.5e-3 against float64 on the H200, 4e-7 in the CPU interpreter). Prints the relative error of
a [M, K] x [K, N] fp32 dot per precision and per shape, and of exp2. Usage: PYTHONPATH=src python3
scripts/gpu_fp32_dot_check.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, input_precision=PREC))


@triton.jit
def _trans_dot_kernel(
    a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr
):
    # the attention form: scores = q @ trans(k) with k loaded as [N, K] rows
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    kt = tl.load(b_ptr + n[:, None] * K + k[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, tl.trans(kt), input_precision=PREC))


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
    for M, N, K in [(128, 64, 16), (128, 64, 32), (64, 64, 64), (16, 16, 16)]:
        a = torch.randn(M, K, device="cuda")
        b = torch.randn(K, N, device="cuda")
        ref = a.double() @ b.double()
        for prec in ("ieee", "tf32"):
            c = torch.empty(M, N, device="cuda")
            _dot_kernel[(1,)](a, b, c, M, N, K, prec)
            err = float((c.double() - ref).abs().max() / ref.abs().max())
            c2 = torch.empty(M, N, device="cuda")
            _trans_dot_kernel[(1,)](a, b.t().contiguous(), c2, M, N, K, prec)
            err2 = float((c2.double() - ref).abs().max() / ref.abs().max())
            print(f"  M={M:3} N={N:3} K={K:3} {prec:5}: dot {err:.1e}  dot(trans) {err2:.1e}")


if __name__ == "__main__":
    main()
