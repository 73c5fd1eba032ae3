"""Sweep wide-K GEMV configurations of the W4A16 linear at decode M against the tuned table (26B-A4B shapes).

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_gemv_sweep.py [--m 1 2 4] [--out $OUT/gemv.json]
Each candidate is checked against the fp32 reference first, then timed in CUDA graphs (20 launches a graph,
weights rotated through copies larger than L2), as `nvfp4kit bench kernels` times. Prints the best per shape.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from nvfp4kit.kernels.configs import LinearConfig, select_linear_config
from nvfp4kit.tuning.cases import DENSE_SHAPES, DenseCase
from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes, rotation_sets, time_graph

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
ap.add_argument("--out")
args = ap.parse_args()
copy = copy_bandwidth_gbps()
l2 = l2_cache_bytes()
results = []
for op, (n, k) in DENSE_SHAPES.items():
    for m in args.m:
        sets = rotation_sets(n * k * 9 // 16, l2_bytes=l2)
        case = DenseCase.build(op, n, k, m, sets=sets, bf16_sets=1)
        tuned = select_linear_config(m, n, k, device="cuda")
        base_us = time_graph(case.call(tuned), sets=sets, calls=20, repeats=7)
        best = (base_us, tuned)
        bm = 1 if m == 1 else (2 if m == 2 else 4 if m <= 4 else 8)
        for bn, bk, warps, split, stages in itertools.product(
            (8, 16, 32), (512, 1024), (4, 8), (1, 2), (2, 3)
        ):
            cfg = LinearConfig("gemv", bm, bn, bk, split, num_warps=warps, num_stages=stages, decode="asm")
            try:
                if case.error(cfg) > 2e-2:
                    continue
                us = time_graph(case.call(cfg), sets=sets, calls=20, repeats=7)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  fail {op} {cfg}: {str(exc).splitlines()[0][:100]}")
                continue
            if us < best[0]:
                best = (us, cfg)
        mb = n * k * 9 / 16 / 1e6
        row = {"op": op, "M": m, "tuned_us": round(base_us, 2), "best_us": round(best[0], 2),
               "best_pct_copy": round(100 * mb * 1e6 / (best[0] * 1e-6) / (copy * 1e9), 1),
               "best": best[1].__dict__}  # fmt: skip
        results.append(row)
        print(f"{op:18} M={m}: tuned {base_us:6.2f} us -> best {best[0]:6.2f} us ({row['best_pct_copy']}% copy) "
              f"{best[1]}", flush=True)  # fmt: skip
        del case
        torch.cuda.empty_cache()
if args.out:
    with open(args.out, "w") as fh:
        json.dump({"card": torch.cuda.get_device_name(), "copy_gbps": copy, "rows": results}, fh, indent=1)
print(f"copy {copy:.0f} GB/s")
for r in results:
    print(
        f"{r['op']:18} M={r['M']}: {r['tuned_us']:6.2f} -> {r['best_us']:6.2f} us  {r['best_pct_copy']:5.1f}% copy"
    )
