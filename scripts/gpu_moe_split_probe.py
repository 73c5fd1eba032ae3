"""MoE variants against the tuned configuration, 26B-A4B's MoE layer at decode sizes: the down projection's K
split (`MoEConfig.down_split_k`, split mode) and the nibble halves (`MoEConfig.halves`, every mode).

At one token the down kernel has 44 column blocks x 8 slots = 352 programs, each walking K = 704 in 6 serial
tiles; splitting K gives 2-3x the programs with 2-3 tiles each. Halves: on sm_90 the K-ordered decode leaves
the MMA's activation operand in registers it must copy (IMAD.MOV, ~1 per weight in the split gate_up), the even/
odd halves do not (16% fewer main-loop instructions in the sorted gate_up). Every candidate is checked against
the fp32 reference first, then timed in CUDA graphs (weights and routings rotated as `nvfp4kit bench kernels`).
Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_moe_split_probe.py [--m 1 2 16 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from nvfp4kit.kernels.configs import select_moe_config
from nvfp4kit.tuning.cases import MOE_SHAPE, MoECase
from nvfp4kit.tuning.timing import time_graph

VARIANTS = {  # name -> fields replaced in the tuned configuration (split-only ones are skipped elsewhere)
    "tuned": {},
    "halves": {"halves": True},
    "halves_down_k2": {"halves": True, "down_split_k": 2},
    "down_k2": {"down_split_k": 2},
    "down_k2_bk64": {"down_split_k": 2, "down_block_k": 64},
    "down_k3_bk64": {"down_split_k": 3, "down_block_k": 64},
    "down_k3_bk128": {"down_split_k": 3, "down_block_k": 128},
    "down_k2_bn128": {"down_split_k": 2, "down_block_n": 128},
    "gate_up_k4": {"gate_up_split_k": 4, "gate_up_block_k": 128},
    "gate_up_k4_down_k2": {"gate_up_split_k": 4, "gate_up_block_k": 128, "down_split_k": 2},
    "stages2_down_k2": {"num_stages": 2, "down_split_k": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 16, 64])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json")
    args = ap.parse_args()
    e, k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
    rows = []
    for m in args.m:
        case = MoECase.build(m, weight_sets=2, route_sets=8, with_bf16=False)
        tuned = select_moe_config(m, e, k, h, i, device="cuda")
        for name in ["tuned"] + [v for v in args.variants if v != "tuned"]:
            fields = VARIANTS[name]
            if not tuned.split and set(fields) - {"halves"}:
                continue
            cfg = dataclasses.replace(tuned, **fields)
            row = {"M": m, "variant": name, "config": cfg.__dict__}
            try:
                row["error"] = case.error(cfg)
                row["us"] = (
                    time_graph(case.call(cfg), sets=16, calls=16, repeats=9) if row["error"] < 2e-2 else None
                )
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
                row["failed"] = str(exc).splitlines()[0][:160]
            rows.append(row)
            print(
                json.dumps({key: row.get(key) for key in ("M", "variant", "us", "error", "failed")}),
                flush=True,
            )
        del case
        torch.cuda.empty_cache()
    print("\n| M | variant | us | vs tuned |\n|---|---|---|---|")
    for r in rows:
        base = next(b.get("us") for b in rows if b["M"] == r["M"] and b["variant"] == "tuned")
        us = r.get("us")
        ratio = f"{us / base:.3f}" if us and base else "-"
        print(
            f"| {r['M']} | {r['variant']} | {us:.2f} | {ratio} |"
            if us
            else f"| {r['M']} | {r['variant']} | - | - |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
