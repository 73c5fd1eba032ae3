"""Batch-1 W4A16 linears with the K loop unrolled at compile time: all of a program's weight loads in flight at once.

`scripts/gpu_gemv_floor.py` (H100, session 15) found the batch-1 linears bound by their K loop: a kernel with the
engine's grid that only loads the bytes (`load`) takes 10.6 us for the qkv weights that 16 KB streaming programs
read in 5.4 us, and deeper software pipelines did not help. Here K is a compile-time constant and the loop a
`tl.static_range`, so the loop body is one straight block and ptxas can issue every load of the program before
the first decode. Variants per 26B-A4B dense linear at M=1 (CUDA graphs, weights rotated past the L2):
  tuned         `w4a16_linear` as the engine runs it;
  load / load_unrolled        the engine config's grid only loading its bytes, K loop as now / unrolled;
  load rows BN                BN whole rows a program, each tensor in one load (all bytes in flight at once);
  gemv BNxBK unrolled         the CUDA-core GEMV (fp32 products) with the K loop unrolled;
  dot BNxBK unrolled          the tensor-core tile (the token in row 0 of a 16-row MMA), K loop unrolled.
Each compute variant is checked against fp32 math on the dequantized weight first.
Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_unrolled_k_probe.py [--ops dense_qkv_sliding dense_o_sliding] [--json OUT]
(All six linears took more than 130 s on the H100 in session 15, most of it compiling the unrolled loops, and the
run was cut off before its first row; measure two or three linears a call.)
On the CPU (`TRITON_INTERPRET=1`, small shapes, no timing): `--check-cpu`.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from gpu_gemv_floor import probe_calls  # the engine grid's load floor (this script's folder is on sys.path)

from nvfp4kit.kernels.configs import interpreting, select_linear_config
from nvfp4kit.kernels.nvfp4_tile import fold_scale, load_act_tile, load_weight_raw, load_weight_tile, mma
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4, rel_error

VARIANTS = {  # name -> (kernel, BN, BK, num_warps)
    "gemv 8x256 w4": ("gemv", 8, 256, 4),
    "gemv 4x512 w4": ("gemv", 4, 512, 4),
    "gemv 16x256 w8": ("gemv", 16, 256, 8),
    "dot 16x256 w2": ("dot", 16, 256, 2),
    "dot 32x256 w4": ("dot", 32, 256, 4),
    "dot 64x128 w4": ("dot", 64, 128, 4),
}


@triton.jit
def _unrolled_kernel(
    x_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, N, stride_wn, stride_sn,
    K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % N
    even_k: tl.constexpr = K % BK == 0
    if DOT:
        lanes = tl.arange(0, 16)
        acc = tl.zeros([16, BN], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            x = load_act_tile(x_ptr, lanes * 0, lanes == 0, k0, K, 0, BK, even_k)
            w = load_weight_tile(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, even_k,
                x_ptr.dtype.element_ty,
            )  # fmt: skip
            acc = mma(acc, x, tl.trans(w), INTERPRET)
        y = tl.sum(tl.where(lanes[:, None] == 0, acc, 0.0), axis=0)
    else:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        zero = tl.arange(0, 1)
        for k0 in tl.static_range(0, K, BK):
            x = load_act_tile(x_ptr, zero, zero == 0, k0, K, 0, BK, even_k).to(tl.float32)
            w = load_weight_tile(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, even_k, tl.float32
            )
            acc += w * x
        y = tl.sum(acc, axis=1)
    y = y * fold_scale(s2_ptr, 0, True, ASM)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _load_unrolled_kernel(
    w_ptr, s_ptr, out_ptr, N, stride_wn, stride_sn, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """`gpu_gemv_floor._load_probe` (the engine grid only loading its bytes) with the K loop unrolled."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    even_k: tl.constexpr = K % BK == 0
    acc = tl.zeros([BN], dtype=tl.int32)
    for k0 in tl.static_range(0, K, BK):
        b, s = load_weight_raw(w_ptr, s_ptr, rn % N, k0, K, stride_wn, stride_sn, BK, True, even_k)
        acc += tl.sum(b.to(tl.int32), axis=1) + tl.sum(s.to(tl.int32), axis=1)
    tl.store(out_ptr + rn, acc, mask=rn < N)


@triton.jit
def _load_rows_kernel(w_ptr, s_ptr, out_ptr, N, stride_wn, stride_sn, K: tl.constexpr, BN: tl.constexpr):
    """BN whole rows (bytes and scales) in one load each: every byte of the program in flight at once."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = (rn % N).to(tl.int64)
    kb = tl.arange(0, triton.next_power_of_2(K // 2))
    ks = tl.arange(0, triton.next_power_of_2(K // 16))
    b = tl.load(w_ptr + rows[:, None] * stride_wn + kb[None, :], mask=kb[None, :] < K // 2, other=0)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + ks[None, :], mask=ks[None, :] < K // 16, other=0)
    acc = tl.sum(b.to(tl.int32), axis=1) + tl.sum(s.to(tl.uint8, bitcast=True).to(tl.int32), axis=1)
    tl.store(out_ptr + rn, acc, mask=rn < N)


def load_rows(weight, out: torch.Tensor, bn: int, warps: int) -> torch.Tensor:
    n, k = weight.shape
    packed, scale, _ = weight.kernel_operands()
    _load_rows_kernel[(triton.cdiv(n, bn),)](
        packed, scale, out, n, packed.stride(0), scale.stride(0), K=k, BN=bn, num_warps=warps
    )
    return out


def unrolled_linear(x: torch.Tensor, weight, variant: str, *, asm: int) -> torch.Tensor:
    kernel, bn, bk, warps = VARIANTS[variant]
    n, k = weight.shape
    packed, scale, s2 = weight.kernel_operands()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _unrolled_kernel[(triton.cdiv(n, bn),)](
        x, packed, scale, s2, out, n, packed.stride(0), scale.stride(0),
        K=k, BN=bn, BK=bk, DOT=kernel == "dot", ASM=asm, INTERPRET=interpreting(), num_warps=warps,
    )  # fmt: skip
    return out


def load_unrolled(weight, out: torch.Tensor, bn: int, bk: int, warps: int, stages: int) -> torch.Tensor:
    n, k = weight.shape
    packed, scale, _ = weight.kernel_operands()
    _load_unrolled_kernel[(triton.cdiv(n, bn),)](
        packed, scale, out, n, packed.stride(0), scale.stride(0),
        K=k, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def check_cpu() -> None:
    for n, k in ((40, 256), (24, 528)):  # 528 = 2 x 256 + 16: a masked last K tile
        weight = random_nvfp4(n, k, device="cpu", seed=n)
        x = torch.randn(1, k)
        ref = x @ weight.dequantize(torch.float32).T
        for variant in VARIANTS:
            got = unrolled_linear(x, weight, variant, asm=0)
            assert rel_error(got, ref) < 1e-5, (variant, rel_error(got, ref))
        sums = weight.packed.to(torch.int32).sum(1) + weight.scale.view(torch.uint8).to(torch.int32).sum(1)
        assert torch.equal(load_unrolled(weight, torch.empty(n, dtype=torch.int32), 8, 256, 4, 3), sums)
        assert torch.equal(load_rows(weight, torch.empty(n, dtype=torch.int32), 8, 4), sums)
    print("cpu check: ok")


def measure(op: str, n: int, k: int, *, l2: int) -> dict:
    from nvfp4kit.tuning.timing import rotation_sets, time_graph

    sets = rotation_sets(n * k * 9 // 16, l2_bytes=l2)
    weights = [random_nvfp4(n, k, seed=s) for s in range(sets)]
    asm = 2 if all(w.normal_scales() for w in weights) else 1
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ weights[0].dequantize(torch.float32).T
    cfg = select_linear_config(1, n, k, device="cuda")
    row = {"op": op, "bytes": n * k * 9 // 16, "config": cfg.__dict__}
    row["tuned"] = time_graph(lambda i: w4a16_linear(x, weights[i % sets]), sets=sets)
    loads = torch.empty(n, dtype=torch.int32, device="cuda")
    row["load"] = time_graph(probe_calls(x, weights, cfg, n, k, asm=bool(asm))["load"], sets=sets)
    row["load_unrolled"] = time_graph(
        lambda i: load_unrolled(
            weights[i % sets], loads, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages
        ),
        sets=sets,
    )
    for bn, warps in ((4, 4), (8, 4), (16, 8)):
        row[f"load rows {bn}"] = time_graph(
            lambda i, b=bn, w=warps: load_rows(weights[i % sets], loads, b, w), sets=sets
        )
    for variant in VARIANTS:
        try:
            err = rel_error(unrolled_linear(x, weights[0], variant, asm=asm), exact)
            if err > 1e-2:
                row[variant] = f"error {err:.2e}"
                continue
            row[variant] = time_graph(
                lambda i, v=variant: unrolled_linear(x, weights[i % sets], v, asm=asm), sets=sets
            )
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
            row[variant] = f"failed: {str(exc).splitlines()[0][:80]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--check-cpu", action="store_true")
    ap.add_argument(
        "--ops", nargs="+", default=list(DENSE_SHAPES), help="dense linears to measure (default all)"
    )
    args = ap.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes

    copy_gbps, l2 = copy_bandwidth_gbps(), l2_cache_bytes()
    rows = []
    for op in args.ops:  # each row printed when done: the unrolled kernels take a while to compile
        rows.append(measure(op, *DENSE_SHAPES[op], l2=l2))
        print(json.dumps(rows[-1]), flush=True)
    names = ["tuned", "load", "load_unrolled", "load rows 4", "load rows 8", "load rows 16", *VARIANTS]
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbps:.0f} GB/s; us per call at M=1")
    print("| op | MB | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else r[c] for c in names]
        print(f"| {r['op']} | {r['bytes'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
