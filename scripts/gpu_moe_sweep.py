"""Sweep wide-K fused-MoE configurations at decode token counts against the tuned table (26B-A4B MoE layer).

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_moe_sweep.py [--m 1 2 4] [--out $OUT/moe.json]
First the gate_up tile (down as tuned), then the down tile with the best gate_up. Every candidate is checked
against the fp32 reference before it is timed (CUDA graphs, weights and routings rotated as the benchmark does).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch

from nvfp4kit.kernels.configs import select_moe_config
from nvfp4kit.tuning.cases import MOE_SHAPE, MoECase
from nvfp4kit.tuning.timing import time_graph

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
ap.add_argument("--out")
args = ap.parse_args()
e, k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
rows = []


def timed(case, cfg) -> float | None:
    try:
        if case.error(cfg) > 2e-2:
            return None
        return time_graph(case.call(cfg), sets=16, calls=16, repeats=7)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
        print(f"  fail {cfg}: {str(exc).splitlines()[0][:100]}")
        return None


for m in args.m:
    case = MoECase.build(m, weight_sets=2, route_sets=8, with_bf16=False)
    tuned = select_moe_config(m, e, k, h, i, device="cuda")
    base = timed(case, tuned)
    best = (base, tuned)
    for bn, bk, warps, stages in itertools.product((16, 32), (512, 1024), (4, 8), (2, 3)):
        cfg = dataclasses.replace(
            best[1], gate_up_block_n=bn, gate_up_block_k=bk, gate_up_warps=warps, num_stages=stages
        )
        us = timed(case, cfg)
        if us is not None and us < best[0]:
            best = (us, cfg)
    for bn, bk, warps, mode in itertools.product((32, 64), (256, 512), (4, 8), ("pair", "token")):
        cfg = dataclasses.replace(best[1], down_block_n=bn, down_block_k=bk, down_warps=warps, down_mode=mode)
        us = timed(case, cfg)
        if us is not None and us < best[0]:
            best = (us, cfg)
    rows.append({"M": m, "tuned_us": round(base, 2), "best_us": round(best[0], 2), "best": best[1].__dict__})
    print(f"moe M={m}: tuned {base:.2f} us -> best {best[0]:.2f} us {best[1]}", flush=True)
    del case
    torch.cuda.empty_cache()
if args.out:
    with open(args.out, "w") as fh:
        json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
for r in rows:
    print(f"moe M={r['M']}: {r['tuned_us']:6.2f} -> {r['best_us']:6.2f} us")
