"""`kernels/gemv_mma.py` (FP4 decoded into MMA fragments, no shared memory in the loop) against the engine's tuned
W4A16 configs at decode sizes (issue 14).

For every 26B-A4B dense linear and M = 1, 4, 8, 16 (the MoE up to 8): the exact result (fp32 math on the dequantized weight) first, then
the engine's `w4a16_linear` (the card's tuned table or heuristic) and each gemv_mma config (k_warps, unroll), timed
in CUDA graphs with weights rotated past the L2; GB/s counts the packed weights and scales. Prints a table
(best gemv_mma config, its speed-up) last. Run from the repository root on the GPU machine:
  PYTHONPATH=src python3 scripts/gpu_gemv_mma_probe.py [--json OUT] [--m 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from nvfp4kit.kernels.gemv_mma import gemv_mma
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4, rel_error

# (warps splitting K, unroll, row groups of 8 a program)
CONFIGS = [(kw, un, 1) for kw in (1, 2, 4, 8) for un in (1, 2)]
CONFIGS += [(1, 1, 4), (2, 1, 2), (2, 1, 4), (1, 2, 4), (1, 1, 8), (2, 2, 4), (4, 1, 2), (4, 1, 4)]


def measure(op: str, n: int, k: int, m: int, l2: int) -> dict:
    from nvfp4kit.tuning.timing import rotation_sets, time_graph

    nbytes = n * k * 9 // 16
    sets = rotation_sets(nbytes, l2_bytes=l2)
    weights = [random_nvfp4(n, k, seed=s) for s in range(sets)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ weights[0].dequantize(torch.float32).T
    row: dict = {"op": op, "n": n, "k": k, "m": m, "bytes": nbytes}
    row["tuned_error"] = rel_error(w4a16_linear(x, weights[0]), exact)
    row["tuned"] = time_graph(lambda i: w4a16_linear(x, weights[i % sets]), sets=sets)
    for kw, un, nw in CONFIGS:
        name = f"kw{kw} u{un}" + (f" nw{nw}" if nw > 1 else "")
        try:
            err = rel_error(gemv_mma(x, weights[0], k_warps=kw, unroll=un, row_groups=nw), exact)
            if not err < 1e-2:
                row[name] = f"error {err:.2e}"
                continue
            # a second weight set with subnormal block scales takes the other decoder (ASM=1): checked too
            row[name] = time_graph(
                lambda i, kw=kw, un=un, nw=nw: gemv_mma(
                    x, weights[i % sets], k_warps=kw, unroll=un, row_groups=nw
                ),
                sets=sets,
            )
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            row[name] = f"failed: {str(exc).splitlines()[0][:100]}"
    return row


def measure_moe(m: int) -> dict:
    """The 26B-A4B MoE layer (128 experts, top-8) at m tokens: the engine's fused_moe (tuned table) against
    `moe_frag.fused_moe_frag`, routings rotated (different experts each call), both checked against fp32 math."""
    from nvfp4kit.kernels.moe_frag import fused_moe_frag
    from nvfp4kit.model.ops import TorchBackend
    from nvfp4kit.tuning.cases import MoECase
    from nvfp4kit.tuning.timing import time_graph

    case = MoECase.build(m, weight_sets=1, route_sets=16, with_bf16=False)
    gu, dn = case.gate_up[0], case.down[0]
    ids, weights = case.routes[0]
    ref = TorchBackend().moe(case.xs[0].float(), ids, weights.float(), gu, dn)
    row: dict = {"op": "moe", "m": m, "tuned_error": rel_error(case.call(None)(0), ref)}
    row["tuned"] = time_graph(case.call(None), sets=16)

    def frag(i, kw, un):
        ids, weights = case.routes[i % 16]
        return fused_moe_frag(case.xs[i % 16], ids.reshape(-1), weights.reshape(-1), gu, dn, top_k=8,
                              k_warps=kw, unroll=un)  # fmt: skip

    for kw, un in ((1, 2), (2, 2), (4, 2), (2, 1), (4, 1)):
        name = f"kw{kw} u{un}"
        try:
            err = rel_error(frag(0, kw, un), ref)
            row[name] = (
                time_graph(lambda i, kw=kw, un=un: frag(i, kw, un), sets=16)
                if err < 2e-2
                else f"error {err:.2e}"
            )
        except Exception as exc:  # noqa: BLE001
            row[name] = f"failed: {str(exc).splitlines()[0][:100]}"
    return row


def check_subnormal_scales() -> float:
    """The ASM=1 decoder (some block scales subnormal E4M3): error against fp32 math."""
    w = random_nvfp4(256, 2816, seed=11)
    w.scale.view(torch.uint8)[:, ::7] &= 0x07  # subnormal E4M3 scales (exponent bits zero) in every 7th block
    assert not w.normal_scales()
    x = torch.randn(3, 2816, device="cuda", dtype=torch.bfloat16)
    return rel_error(gemv_mma(x, w), x.float() @ w.dequantize(torch.float32).T)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()
    from nvfp4kit.tuning.timing import l2_cache_bytes

    print(f"card: {torch.cuda.get_device_name()}; subnormal-scale check error {check_subnormal_scales():.2e}")
    l2, rows = l2_cache_bytes(), []
    for m in args.m:
        for op, (n, k) in DENSE_SHAPES.items():
            rows.append(measure(op, n, k, m, l2))
            r = rows[-1]
            timed = sorted(((key, v) for key, v in r.items() if key.startswith("kw") and isinstance(v, float)),
                           key=lambda kv: kv[1])  # fmt: skip
            bad = [f"{key}: {v}" for key, v in r.items() if key.startswith("kw") and isinstance(v, str)]
            best = f"{timed[0][0]} {timed[0][1]:.2f} us" if timed else "none"
            print(f"M={m} {op:18} tuned {r['tuned']:.2f} us | best {best} | " + "  ".join(
                f"{key} {v:.2f}" for key, v in timed[1:5]) + (f" | {bad[:2]}" if bad else ""), flush=True)  # fmt: skip
    for m in (m for m in args.m if m <= 8):
        rows.append(measure_moe(m))
        r = rows[-1]
        print(f"M={m} moe tuned {r['tuned']:.2f} us (err {r['tuned_error']:.1e}) | "
              + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k.startswith("kw")), flush=True)  # fmt: skip
    print("\n| op | M | MB | tuned us | gemv_mma us (config) | speed-up | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        timed = sorted((v, key) for key, v in r.items() if key.startswith("kw") and isinstance(v, float))
        if not timed:
            print(f"| {r['op']} | {r['m']} | {r.get('bytes', 0) / 1e6:.1f} | {r['tuned']:.2f} | none | | |")
            continue
        best, name = timed[0]
        if r["op"] == "moe":
            print(
                f"| moe | {r['m']} | | {r['tuned']:.2f} | {best:.2f} ({name}) | {r['tuned'] / best:.2f}x | |"
            )
            continue
        print(f"| {r['op']} | {r['m']} | {r['bytes'] / 1e6:.1f} | {r['tuned']:.2f} | {best:.2f} ({name}) | "
              f"{r['tuned'] / best:.2f}x | {r['bytes'] / best / 1e3:.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
