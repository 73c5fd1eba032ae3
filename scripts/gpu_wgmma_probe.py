"""The Gluon W4A16 wgmma kernel (`kernels/w4a16_wgmma.py`) against BF16 cuBLAS and the engine's own linear.

For each 26B-A4B dense linear and M: error against fp32 math on the dequantized weight, median microseconds (CUDA graph replay) of
BF16 cuBLAS (weight already expanded), the engine's `w4a16_linear` (expansion + cuBLAS at M >= 1,024, Triton
tiles below), the activation gather into the kernel's K order alone, and each wgmma config (block_t, warps,
stages, wgmma groups in flight), with the ratio to cuBLAS. One JSON row per (op, M, variant) under --out.
Usage: PYTHONPATH=src python3 scripts/gpu_wgmma_probe.py --out DIR [--ms 16 64 1024 4096] [--ops dense_qkv_sliding]
"""

# ruff: noqa: B023  (every lambda here is timed and dropped inside its loop iteration)
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.kernels.w4a16_wgmma import k_permutation, permute_activations, w4a16_wgmma
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4, rel_error

# (block_t, num_warps, stages, in_flight, split_k, row_reps): decode sizes (M <= 64) and prefill sizes
SMALL_M = [(16, 4, 8, 1, 1, 1), (16, 4, 8, 1, 4, 1), (16, 4, 6, 1, 8, 1)]
MID_M = [(64, 4, 4, 1, 1, 1), (64, 4, 6, 1, 2, 1), (64, 4, 6, 1, 4, 1), (64, 4, 6, 1, 8, 1)]
LARGE_M = [
    (256, 4, 3, 1, 1, 1),
    (128, 8, 4, 1, 1, 1),
    (128, 8, 4, 1, 1, 2),
    (128, 8, 3, 1, 1, 2),
    (64, 8, 4, 1, 1, 2),
]


def variants(m: int) -> list[tuple[int, ...]]:
    return SMALL_M if m <= 16 else MID_M if m <= 64 else LARGE_M


def bench_us(fn) -> float:
    """Median us of fn replayed in a CUDA graph: the kernels' time, not Python's launch overhead (which at M <= 64
    is larger than the kernels)."""
    fn()
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=[16, 64, 1024, 4096])
    ap.add_argument("--ops", nargs="+", default=list(DENSE_SHAPES))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    for op in args.ops:
        n, k = DENSE_SHAPES[op]
        w = random_nvfp4(n, k)
        w_bf16 = w.dequantize(torch.bfloat16)
        perm = k_permutation(k, "cuda")
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.dequantize(torch.float32).T
            base = {"op": op, "m": m, "n": n, "k": k}
            t_cublas = bench_us(lambda: x @ w_bf16.T)
            t_engine = bench_us(lambda: w4a16_linear(x, w))
            t_perm = bench_us(lambda: permute_activations(x, perm))
            rows.append(
                {**base, "variant": "cublas_bf16", "us": t_cublas, "err": rel_error(x @ w_bf16.T, ref)}
            )
            rows.append(
                {**base, "variant": "engine", "us": t_engine, "err": rel_error(w4a16_linear(x, w), ref)}
            )
            rows.append({**base, "variant": "permute", "us": t_perm})
            xp = permute_activations(x, perm)
            for bt, warps, stages, fl, sk, reps in variants(m):
                name = f"wg_t{bt}w{warps}s{stages}f{fl}k{sk}r{reps}"
                kw = dict(block_t=bt, num_warps=warps, stages=stages, in_flight=fl, split_k=sk, row_reps=reps)
                try:
                    err = rel_error(w4a16_wgmma(xp, w, **kw), ref)
                    us = bench_us(lambda: w4a16_wgmma(xp, w, **kw))
                except Exception as exc:  # a config the card cannot launch: say so, keep going
                    log(f"{op} m={m} {name}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                rows.append({**base, "variant": name, "us": us, "err": err})
            done = [r for r in rows if r["op"] == op and r["m"] == m]
            line = " ".join(
                f"{r['variant']}={r['us']:.1f}" + (f"(e{r['err']:.0e})" if "err" in r else "") for r in done
            )
            log(f"{op} m={m}: {line}")
    (out_dir / "wgmma_probe.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'op':<20}{'M':>6}{'cuBLAS':>9}{'engine':>9}{'perm':>7}  best wgmma (us, x of cuBLAS, err)")
    for op in args.ops:
        for m in args.ms:
            sel = [r for r in rows if r["op"] == op and r["m"] == m]
            by = {r["variant"]: r for r in sel}
            wg = [r for r in sel if r["variant"].startswith("wg_") and r["err"] < 1e-2]
            best = min(wg, key=lambda r: r["us"]) if wg else None
            cb = by["cublas_bf16"]["us"]
            tail = (
                f"{best['variant']} {best['us']:.1f} ({cb / best['us']:.2f}x) {best['err']:.0e}"
                if best
                else "none correct"
            )
            print(f"{op:<20}{m:>6}{cb:>9.1f}{by['engine']['us']:>9.1f}{by['permute']['us']:>7.1f}  {tail}")


if __name__ == "__main__":
    main()
