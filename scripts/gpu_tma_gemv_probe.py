"""Small-M W4A16 linears with the weight tiles brought in by the Hopper bulk copy engine (TMA), a probe.

Sessions 15-26 found the batch-1 dense linears bound by how few weight bytes each warp keeps in flight (one
16-byte load a lane a K step, `cp.async` or register loads), not by the FP4 decode: the same grid only loading
its bytes takes 2x what 16 KB streaming programs take. A TMA copy is one instruction for a whole [BN, BK/2]
byte tile, so with S pipeline stages a program keeps S tiles in flight whatever its warps do. This kernel is
`_w4a16_dot_kernel`'s swapped-operand, nibble-halves form (weight rows are the MMA's M, the M <= 16 tokens
its N) with the codes (and, where the row stride allows, the block scales) read through tensor descriptors.

Run on an sm_90 GPU from the repository root (each variant checked against fp32 math, then timed in CUDA
graphs with weights rotated past the L2, beside the engine's own config for that shape):
  PYTHONPATH=src python3 scripts/gpu_tma_gemv_probe.py [--m 1 16] [--ops dense_qkv_sliding ...] [--json OUT]
On the CPU: `--check` runs the kernel once in Triton's interpreter on a small shape against fp32 math, and
`--sass` cross-compiles it for sm_90 and prints whether the loop's copies are TMA and how many stages it keeps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nvfp4kit.kernels.launch import wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import _decode_halves, load_act_halves, mma
from nvfp4kit.kernels.w4a16_linear import _write_output


@triton.jit(do_not_specialize=["M"])
def _w4a16_tma_kernel(
    x_ptr, w_desc, s_desc, s_ptr, s2_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_sn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
    SCALE_TMA: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n0 = pid_n * BN
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in tl.range(pid_k * BK, K, BK * SPLIT_K, num_stages=STAGES):
        b = w_desc.load([n0, k0 // 2])  # rows past N and bytes past K/2 arrive as zeros
        if SCALE_TMA:
            s = s_desc.load([n0, k0 // 16])
        else:  # a row stride the copy engine does not take (not a multiple of 16 bytes)
            ks = k0 // 16 + tl.arange(0, BK // 16)
            rows = rn % N
            s = tl.load(s_ptr + rows[:, None] * stride_sn + ks[None, :], mask=ks[None, :] < K // 16, other=0)
        xe, xo = load_act_halves(x_ptr, rm, m_ok, k0, K, stride_xm, BK, False)
        we, wo = _decode_halves(b, s, BN, BK, ASM)
        acc = mma(acc, we.to(dtype), tl.trans(xe), INTERPRET)
        acc = mma(acc, wo.to(dtype), tl.trans(xo), INTERPRET)
    _write_output(
        tl.trans(acc), out_ptr, ws_ptr, counter_ptr, s2_ptr, rm, rn, M, N, stride_om, pid_n, pid_k, SPLIT_K, ASM
    )  # fmt: skip


@triton.jit
def _w4a16_tma_gemv_kernel(
    x_ptr, w_desc, s_desc, s_ptr, s2_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_sn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
    SCALE_TMA: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The same tiles multiplied on the CUDA cores (one token row, fp32 products summed over K at the end)."""
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n0 = pid_n * BN
    acc = tl.zeros([BN, BK // 2], dtype=tl.float32)
    for k0 in tl.range(pid_k * BK, K, BK * SPLIT_K, num_stages=STAGES):
        b = w_desc.load([n0, k0 // 2])
        if SCALE_TMA:
            s = s_desc.load([n0, k0 // 16])
        else:
            ks = k0 // 16 + tl.arange(0, BK // 16)
            rows = rn % N
            s = tl.load(s_ptr + rows[:, None] * stride_sn + ks[None, :], mask=ks[None, :] < K // 16, other=0)
        xe, xo = load_act_halves(x_ptr, rm, m_ok, k0, K, stride_xm, BK, False)
        we, wo = _decode_halves(b, s, BN, BK, ASM)
        acc += we.to(tl.float32) * xe.to(tl.float32)  # [BN, BK/2] * [1, BK/2]
        acc += wo.to(tl.float32) * xo.to(tl.float32)
    y = tl.sum(acc, axis=1)[None, :]
    _write_output(
        y, out_ptr, ws_ptr, counter_ptr, s2_ptr, rm, rn, M, N, stride_om, pid_n, pid_k, SPLIT_K, ASM
    )


def tma_linear(x, weight, *, bn=64, bk=256, split=1, stages=4, warps=4, asm=None, pdl=False, cores=False):
    """x [M, K] (M <= 16) @ dequant(weight [N, K])^T -> [M, N] in x.dtype through `_w4a16_tma_kernel`."""
    from nvfp4kit.kernels.split_k import arrival_counters

    m, k = x.shape
    n = weight.shape[0]
    packed, scale, s2 = weight.kernel_operands()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if asm is None:
        asm = 0 if interpret else (2 if weight.normal_scales() else 1)
    w_desc = TensorDescriptor(packed, [n, k // 2], [packed.stride(0), 1], [bn, bk // 2])
    scale_tma = scale.stride(0) % 16 == 0
    s_desc = (
        TensorDescriptor(scale, [n, k // 16], [scale.stride(0), 1], [bn, bk // 16]) if scale_tma else w_desc
    )
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = max(1, min(split, triton.cdiv(k, bk)))
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, triton.cdiv(n, bn))
    else:
        ws = counters = out
    bm = 1 if cores else 16
    if cores and m > 1:
        raise ValueError("the CUDA-core form takes one token")
    kernel = _w4a16_tma_gemv_kernel if cores else _w4a16_tma_kernel
    kernel[(triton.cdiv(n, bn), split)](
        x, w_desc, s_desc, scale, s2, out, ws, counters, m, n, k, x.stride(0), scale.stride(0), out.stride(0),
        BM=bm, BN=bn, BK=bk, SPLIT_K=split, STAGES=stages, SCALE_TMA=scale_tma, ASM=asm, INTERPRET=interpret,
        PDL=pdl, num_warps=warps,
    )  # fmt: skip
    return out


def core_variants() -> dict[str, dict]:
    out = {}
    for bn, bk, stages, split, warps in itertools.product(
        (16, 32, 64), (256, 512), (3, 5), (1, 2, 4), (4, 8)
    ):
        if bn * bk // 2 // (warps * 32) > 64:  # fp32 products a thread
            continue
        kw = dict(bn=bn, bk=bk, stages=stages, split=split, warps=warps, cores=True)
        out[f"cores {bn}x{bk} s{stages} k{split} w{warps}"] = kw
    return out


def variants() -> dict[str, dict]:
    out = {}
    for bn, bk, stages, split in itertools.product((64, 128), (256, 512), (3, 5), (1, 2, 4)):
        warps = 4 if bn == 64 else 8  # one warpgroup a 64 weight rows
        if bn * bk // 2 * stages > 160 * 1024:
            continue
        out[f"tma {bn}x{bk} s{stages} k{split} w{warps}"] = dict(
            bn=bn, bk=bk, stages=stages, split=split, warps=warps
        )
    return out


def check_cpu() -> None:
    from nvfp4kit.tuning.cases import random_nvfp4

    torch.manual_seed(0)
    for n, k, m in ((96, 512, 1), (80, 352 * 2, 3)):  # a row tail, K = 704 (scales not TMA-aligned)
        w = random_nvfp4(n, k, device="cpu", seed=1)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        ref = x.float() @ w.dequantize(torch.float32).T
        for split in (1, 2):
            y = tma_linear(x, w, bn=64, bk=256, split=split, stages=2).float()
            err = (y - ref).norm() / ref.norm()
            print(f"interpreter n={n} k={k} m={m} split={split}: rel error {err:.2e}")
            assert err < 1e-2, err
            y = tma_linear(x[:1], w, bn=32, bk=256, split=split, stages=2, cores=True).float()
            err = (y - ref[:1]).norm() / ref[:1].norm()
            print(f"interpreter, CUDA cores, n={n} k={k} split={split}: rel error {err:.2e}")
            assert err < 1e-2, err


def sass() -> None:
    from nvfp4kit.tuning.cases import random_nvfp4
    from nvfp4kit.tuning.cross_compile import compile_for

    w = random_nvfp4(8192, 2816, device="cpu", seed=1)
    x = torch.randn(1, 2816, dtype=torch.bfloat16)
    captured = {}
    original = triton.runtime.jit.JITFunction.run

    def keep(self, *args, **kwargs):
        kernel = original(self, *args, **kwargs)
        captured["k"] = kernel
        return kernel

    triton.runtime.jit.JITFunction.run = keep
    try:
        with compile_for((9, 0), 132) as records:
            tma_linear(x, w, bn=64, bk=256, stages=4, asm=2)
            if os.environ.get("CORES"):
                tma_linear(x, w, bn=32, bk=256, stages=4, asm=2, warps=8, cores=True)
    finally:
        triton.runtime.jit.JITFunction.run = original
    kernel = captured["k"]
    ttgir = kernel.asm["ttgir"]
    print(records[-1])
    for key in (
        "async_tma_copy_global_to_local",
        "barrier_expect",
        "wait_barrier",
        "local_alloc",
        "warp_group_dot",
    ):
        print(f"{key}: {ttgir.count(key)}")
    print([line.strip()[:160] for line in ttgir.splitlines() if "local_alloc" in line][:4])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ops", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--family", choices=["mma", "cores", "both"], default="both")
    args = ap.parse_args()
    if args.check:
        return check_cpu()
    if args.sass:
        return sass()
    from nvfp4kit.kernels.configs import select_linear_config
    from nvfp4kit.tuning.cases import DENSE_SHAPES, DenseCase
    from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes, rotation_sets, time_graph

    copy = copy_bandwidth_gbps()
    l2 = l2_cache_bytes()
    rows = []
    for op in args.ops or list(DENSE_SHAPES):
        n, k = DENSE_SHAPES[op]
        nbytes = n * k * 9 // 16
        sets = rotation_sets(nbytes, l2_bytes=l2)
        for m in args.m:
            case = DenseCase.build(op, n, k, m, sets=sets, bf16_sets=1)
            ref = case.xs[0].float() @ case.weights[0].dequantize(torch.float32).T
            timed = {"engine": time_graph(case.call(None), sets=sets)}
            family = {}
            if args.family in ("mma", "both"):
                family.update(variants())
            if args.family in ("cores", "both") and m == 1:
                family.update(core_variants())
            for name, kw in family.items():
                try:
                    y = tma_linear(case.xs[0], case.weights[0], **kw).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"  {op} m={m} {name}: error {err:.3g}, skipped")
                        continue
                    timed[name] = time_graph(
                        lambda i, kw=kw, c=case, n=sets: tma_linear(c.xs[i % n], c.weights[i % n], **kw),
                        sets=sets,
                    )
                except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, skipped
                    print(f"  {op} m={m} {name}: {str(exc).splitlines()[0][:120]}")
            best = min((v for v in timed if v != "engine"), key=timed.get, default=None)
            eng = timed["engine"]
            line = f"{op:18} m={m:2} {nbytes / 1e6:5.1f} MB engine {eng:6.2f} us ({nbytes / eng / 1e3:5.0f} GB/s)"
            if best:
                line += f"  best {best}: {timed[best]:6.2f} us ({nbytes / timed[best] / 1e3:5.0f} GB/s) {eng / timed[best]:.2f}x"
            print(line, flush=True)
            cfg = select_linear_config(m, n, k, device="cuda")
            rows.append(
                {
                    "op": op,
                    "m": m,
                    "n": n,
                    "k": k,
                    "bytes": nbytes,
                    "engine_config": cfg.__dict__,
                    "us": timed,
                }
            )
    card = torch.cuda.get_device_name()
    print(f"{card}, copy {copy:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "copy_gbps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
