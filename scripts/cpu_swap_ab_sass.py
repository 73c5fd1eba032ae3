"""Does the MMA with the decoded FP4 weights as its A operand ("swap AB") issue fewer instructions than the MoE's
form today (weights as B)? A CPU-only experiment for the mid-size MoE (docs/benchmarks.md, "Session 20"): two
toy single-expert GEMM kernels, identical but for the operand order, compiled for a card that is not here
(`tuning.cross_compile`), their main loops counted from the SASS as `cpu_sass_counts.py` does.

  * `weights_b`: acc[BM, BN] += x[BM, BK] @ w[BN, BK]^T, what `_moe_gate_up_kernel` does;
  * `weights_a`: acc[BN, BM] += w[BN, BK] @ x[BM, BK]^T: the weight rows fill the MMA's M side (64+ rows: a
    Hopper warpgroup MMA), the few tokens of an expert block its N side (8-256).

  python3 scripts/cpu_swap_ab_sass.py [--arch 9.0] [--bm 16 32 128] [--bn 64] [--bk 128] [--warps 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from cpu_sass_counts import main_loop, sass_of  # noqa: E402

from nvfp4kit.kernels.nvfp4_tile import load_weight_tile  # noqa: E402
from nvfp4kit.tuning import cross_compile  # noqa: E402
from nvfp4kit.tuning.cases import random_nvfp4  # noqa: E402


@triton.jit
def _toy_gemm(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, WEIGHTS_A: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    if WEIGHTS_A:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        w = load_weight_tile(
            w_ptr, s_ptr, rn, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, True, tl.bfloat16
        )
        if WEIGHTS_A:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if WEIGHTS_A:
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], acc.to(tl.bfloat16), mask=rm[None, :] < M)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(tl.bfloat16), mask=rm[:, None] < M)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="9.0")
    ap.add_argument("--bm", type=int, nargs="+", default=[16, 32, 128])
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args()
    capability = tuple(int(v) for v in args.arch.split("."))
    n, k = 1408, 2816  # one expert's gate_up at 26B-A4B
    w = random_nvfp4(n, k, device="cpu")
    compiled = []
    record = cross_compile._record

    def keep(fn, kernel, kwargs):
        rec = record(fn, kernel, kwargs)
        compiled.append((kernel.asm["cubin"], rec.registers, rec.spills, rec.shared))
        return rec

    cross_compile._record = keep
    print(
        f"sm_{args.arch.replace('.', '')}: BN {args.bn} x BK {args.bk}, {args.warps} warps; main loop per weight"
    )
    for bm in args.bm:
        x = torch.randn(bm, k).bfloat16()
        out = torch.empty(bm, n, dtype=torch.bfloat16)
        for weights_a in (False, True):
            compiled.clear()
            packed, scale, _ = w.kernel_operands()
            with cross_compile.compile_for(capability, 132, zero_allocations=True):
                _toy_gemm[(1, n // args.bn)](
                    x, packed, scale, out, bm, n, k, x.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
                    BM=bm, BN=args.bn, BK=args.bk, ASM=2, WEIGHTS_A=weights_a, num_warps=args.warps, num_stages=3,
                )  # fmt: skip
            cubin, regs, spills, smem = compiled[-1]
            count, ops = main_loop(sass_of(cubin))
            per = args.bn * args.bk / (32 * args.warps)
            top = ", ".join(f"{op}:{c}" for op, c in ops.most_common(7))
            name = "weights_a" if weights_a else "weights_b"
            print(
                f"BM={bm:<4d} {name}  {count:4d} instr / {per:.0f} weights = {count / per:.2f}  regs {regs} "
                f"spills {spills} smem {smem // 1024} KB | {top}",
                flush=True,
            )


if __name__ == "__main__":
    main()
