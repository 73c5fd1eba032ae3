"""Batch-1 GEMV variants that avoid shared-memory layout conversions in the K loop (issue 14).

Session 16 compiled the engine's batch-1 GEMV for sm_90 on the CPU (`scripts/cpu_sass_counts.py --m 1`): every
K step converts layouts through shared memory (8 barriers, 9 `ldmatrix`, 8 shared stores an iteration of
`gemv 8x1024`), and the loop issues ~7 instructions a weight. Here each program reads its block scales once per
packed byte (no broadcast or reshape of the scale tile) and decodes with the engine's PTX; the activation
vector is loaded either 1-D and moved into the weight tile's layout (X=0: 4 barriers a loop) or through
pointers broadcast to the weight tile's shape (X=1: no conversion and no barrier in the loop, but scalar 2-byte
loads, L1 hits). For every 26B-A4B dense linear at M=1 this times the engine's config and each variant (CUDA
graphs, weights rotated past the L2), each checked against fp32 math first. Run from the repository root:
  PYTHONPATH=src python3 scripts/gpu_gemv_layout_probe.py [--json OUT]      # on the GPU
  TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/gpu_gemv_layout_probe.py --check-cpu
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.configs import select_linear_config
from nvfp4kit.kernels.nvfp4_tile import decode_bytes, fold_scale, scale_operand
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4, rel_error

VARIANTS = [
    (bn, bk, warps, x)
    for x in (0, 1, 2, 3)
    for bn, bk, warps in ((8, 1024, 4), (4, 1024, 4), (8, 512, 4), (16, 512, 8))
]


@triton.jit
def _gemv_kernel(x_ptr, xp_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, N, K, stride_wn, stride_sn,
                 BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, X: tl.constexpr):  # fmt: skip
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = rn % N
    acc = tl.zeros([BN, BK // 2], tl.float32)
    for k0 in range(0, K, BK):
        kb = k0 // 2 + tl.arange(0, BK // 2)
        ok = (kb < K // 2)[None, :]
        b = tl.load(w_ptr + rows[:, None] * stride_wn + kb[None, :], mask=ok, other=0)
        s = tl.load(
            s_ptr + rows[:, None] * stride_sn + kb[None, :] // 8, mask=ok, other=0
        )  # a scale per byte
        if X == 0:
            xe = tl.load(x_ptr + 2 * kb, mask=kb < K // 2, other=0.0).to(tl.float32)[None, :]
            xo = tl.load(x_ptr + 2 * kb + 1, mask=kb < K // 2, other=0.0).to(tl.float32)[None, :]
        elif X == 1:
            xe = tl.load(x_ptr + 2 * kb[None, :] + 0 * rows[:, None], mask=ok, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * kb[None, :] + 1 + 0 * rows[:, None], mask=ok, other=0.0).to(tl.float32)
        else:  # X >= 2: x read as int32 pairs (little-endian: even K in the low half); bf16 -> fp32 is a 16-bit shift
            pair = tl.load(xp_ptr + kb[None, :] + 0 * rows[:, None], mask=ok, other=0)
            xe = (pair << 16).to(tl.float32, bitcast=True)
            xo = (pair & -65536).to(tl.float32, bitcast=True)
        lo, hi = decode_bytes(b, scale_operand(s, ASM), ASM)
        if X == 3:  # two fused multiply-adds a byte instead of a multiply, an FMA and an add
            acc += lo.to(tl.float32) * xe
            acc += hi.to(tl.float32) * xo
        else:
            acc += lo.to(tl.float32) * xe + hi.to(tl.float32) * xo
    y = tl.sum(acc, axis=1) * fold_scale(s2_ptr, 0, True, ASM)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)


def gemv(x: torch.Tensor, weight, variant: tuple[int, int, int, int], *, asm: int) -> torch.Tensor:
    bn, bk, warps, xmode = variant
    n, k = weight.shape
    packed, scale, s2 = weight.kernel_operands()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, x.view(torch.int32), packed, scale, s2, out, n, k, packed.stride(0), scale.stride(0),
        BN=bn, BK=bk, ASM=asm, X=xmode, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def check_cpu() -> None:
    weight = random_nvfp4(40, 2816, device="cpu", seed=3)  # 2816 = 2.75 x 1024: a masked last K tile
    x = torch.randn(1, 2816).bfloat16()  # the engine's activations; X=2 reads them as bf16 pairs
    ref = x.float() @ weight.dequantize(torch.float32).T
    for bn, bk, warps, xmode in VARIANTS:
        got = gemv(x, weight, (bn, bk, warps, xmode), asm=0)
        assert rel_error(got, ref) < 1e-2, (bn, bk, xmode, rel_error(got, ref))  # bf16 output
    print("cpu check: ok")


def measure(op: str, n: int, k: int, l2: int) -> dict:
    from nvfp4kit.tuning.timing import rotation_sets, time_graph

    sets = rotation_sets(n * k * 9 // 16, l2_bytes=l2)
    weights = [random_nvfp4(n, k, seed=s) for s in range(sets)]
    asm = 2 if all(w.normal_scales() for w in weights) else 1
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ weights[0].dequantize(torch.float32).T
    row = {"op": op, "tuned_config": select_linear_config(1, n, k, device="cuda").__dict__}
    row["tuned"] = time_graph(lambda i: w4a16_linear(x, weights[i % sets]), sets=sets)
    for variant in VARIANTS:
        name = "{}x{} w{} x{}".format(*variant)
        if asm != 2:
            continue  # the probe's PTX path decodes normal scales only
        try:
            err = rel_error(gemv(x, weights[0], variant, asm=asm), exact)
            if err > 1e-2:
                row[name] = f"error {err:.2e}"
                continue
            row[name] = time_graph(lambda i, v=variant: gemv(x, weights[i % sets], v, asm=asm), sets=sets)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
            row[name] = f"failed: {str(exc).splitlines()[0][:80]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--check-cpu", action="store_true")
    args = ap.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    from nvfp4kit.tuning.timing import l2_cache_bytes

    l2, rows = l2_cache_bytes(), []
    for op, (n, k) in DENSE_SHAPES.items():
        rows.append(measure(op, n, k, l2))
        timed = sorted(
            ((key, v) for key, v in rows[-1].items() if isinstance(v, float)), key=lambda kv: kv[1]
        )
        print(f"{op:18} " + "  ".join(f"{key} {v:.2f}" for key, v in timed[:5]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
