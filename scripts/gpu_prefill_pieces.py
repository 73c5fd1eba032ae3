"""Where a prefill-sized NVFP4 linear's time goes (issue 15): the weight's expansion, cuBLAS on an expanded copy (the
BF16 baseline), the two together (the engine's path, `w4a16_linear` at M >= DEQUANT_MIN_M, and the same two calls on a buffer of
our own, `own`), in CUDA graphs over weight copies rotated past the L2 (each layer's weight is a different one), plus the
pair timed by triton's do_bench as `gpu_prefill_gemm.py` times it. Session 23's H100 run of that script had the pair
at 1,024 tokens at ~2x the sum of its parts. Prints a table.
Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_prefill_pieces.py [--ms 512 1024 2048]
"""

# ruff: noqa: B023  (every lambda here is timed inside its loop iteration)
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from nvfp4kit.kernels.dequant import dequantize_nvfp4
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets, time_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[512, 1024, 2048])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    l2 = l2_cache_bytes()
    print(f"{torch.cuda.get_device_name()}\n{'op':18s} {'M':>5s} {'bf16':>7s} {'expand':>7s} "
          f"{'pair':>7s} {'own':>7s} {'dobench':>8s}  pair/bf16")  # fmt: skip
    for op, (n, k) in DENSE_SHAPES.items():
        sets = rotation_sets(2 * n * k, l2_bytes=l2, cap=4)
        ws = [random_nvfp4(n, k, seed=s) for s in range(sets)]
        dense = [w.dequantize(torch.bfloat16) for w in ws]
        scratch = torch.empty_like(dense[0])
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {
                "bf16": time_graph(lambda i: F.linear(x, dense[i]), sets=sets, calls=8, repeats=9),
                "expand": time_graph(
                    lambda i: dequantize_nvfp4(ws[i], out=scratch), sets=sets, calls=8, repeats=9
                ),
                "pair": time_graph(lambda i: w4a16_linear(x, ws[i]), sets=sets, calls=8, repeats=9),
            }
            t["own"] = time_graph(
                lambda i: F.linear(x, dequantize_nvfp4(ws[i], out=scratch)), sets=sets, calls=8, repeats=9
            )
            t["dobench"] = 1000 * triton.testing.do_bench(lambda: w4a16_linear(x, ws[0]), warmup=3, rep=20,
                                                          return_mode="median")  # fmt: skip
            print(f"{op:18s} {m:5d} " + " ".join(f"{t[key]:7.1f}" for key in ("bf16", "expand", "pair", "own"))
                  + f" {t['dobench']:8.1f}  {t['pair'] / t['bf16']:.2f}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
