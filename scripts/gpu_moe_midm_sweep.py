"""Sweep sorted-mode fused-MoE tiles at batch-decode and mixed-step token counts (26B-A4B MoE layer).

The tuner's candidate list at these sizes is short (`tuning/search.moe_candidates`); this script times a wider
grid so that the list can be widened where it pays. First the gate_up tile (block_m, block_n, block_k, warps,
stages; down as selected), then the down tile with the best gate_up. The winner is checked against the fp32
reference. Run on the lent GPU:

    PYTHONPATH=src python3 scripts/gpu_moe_midm_sweep.py --m 96 706 2048 --budget-s 100 --out $OUT/moe_midm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import torch

from nvfp4kit.kernels.configs import select_moe_config
from nvfp4kit.kernels.thresholds import MOE_PREFILL_MIN_TOKENS
from nvfp4kit.tuning.cases import MOE_SHAPE, MoECase
from nvfp4kit.tuning.timing import time_graph

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, nargs="+", default=[96, 706, 2048])
ap.add_argument("--budget-s", type=float, default=100.0, help="seconds per token count")
ap.add_argument("--out")
args = ap.parse_args()
e, k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
rows = []


def timed(case, cfg) -> float | None:
    try:
        return time_graph(case.call(cfg), sets=4, calls=8, repeats=5)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
        print(f"  fail {cfg}: {str(exc).splitlines()[0][:100]}", flush=True)
        return None


for m in args.m:
    start = time.monotonic()
    deadline = start + args.budget_s
    case = MoECase.build(m, weight_sets=2, route_sets=4, with_bf16=False)
    base_cfg = dataclasses.replace(select_moe_config(m, e, k, h, i, device="cuda"), split=False, sorted=True)
    base = timed(case, base_cfg)
    best = (base, base_cfg)
    per_expert = m * k / e
    block_ms = (16, 32) if per_expert <= 16 else (32, 64, 128)
    gate_up = itertools.product(
        block_ms, ((64, 128), (128, 64), (32, 128), (64, 64), (128, 128), (32, 256)), (4, 8), (3, 4, 2)
    )
    tried = 0
    for bm, (bn, bk), warps, stages in gate_up:
        if time.monotonic() > start + 0.7 * args.budget_s:  # leave time for the down tiles
            break
        cfg = dataclasses.replace(
            best[1],
            block_m=bm,
            gate_up_block_n=bn,
            gate_up_block_k=bk,
            gate_up_warps=warps,
            num_stages=stages,
        )
        us = timed(case, cfg)
        tried += 1
        if us is not None and us < best[0]:
            best = (us, cfg)
            print(f"  M={m} gate_up {us:.1f} us {bm=} {bn=} {bk=} {warps=} {stages=}", flush=True)
    for (bn, bk), warps in itertools.product(
        ((128, 64), (64, 64), (128, 128), (256, 64), (64, 128), (256, 32)), (4, 8)
    ):
        if time.monotonic() > deadline:
            break
        cfg = dataclasses.replace(best[1], down_block_n=bn, down_block_k=bk, down_warps=warps)
        us = timed(case, cfg)
        tried += 1
        if us is not None and us < best[0]:
            best = (us, cfg)
            print(f"  M={m} down {us:.1f} us {bn=} {bk=} {warps=}", flush=True)
    # the default path without a config: at MOE_PREFILL_MIN_TOKENS and more, the grouped cuBLAS-class GEMMs
    grouped = timed(case, None) if m >= MOE_PREFILL_MIN_TOKENS else None
    err = case.error(best[1])
    rows.append(
        {"M": m, "selected_us": round(base, 1), "best_us": round(best[0], 1), "grouped_us": grouped, "tried": tried,
         "error": err,
         "selected": base_cfg.__dict__, "best": best[1].__dict__}
    )  # fmt: skip
    print(f"moe M={m}: selected {base:.1f} us -> best {best[0]:.1f} us (err {err:.2e}, {tried} tried) {best[1]}",
          flush=True)  # fmt: skip
    del case
    torch.cuda.empty_cache()
print("\n   M  selected_us  best_us  speedup  grouped_us")
for r in rows:
    speedup = r["selected_us"] / r["best_us"]
    print(
        f"{r['M']:>4} {r['selected_us']:>12} {r['best_us']:>8} {speedup:>8.2f}  {r['grouped_us'] or '':>10}"
    )
if args.out:
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
