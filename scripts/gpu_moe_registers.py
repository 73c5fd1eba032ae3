"""Register caps (Triton's maxnreg) on the sorted-mode MoE tiles at serving's batch sizes (26B-A4B MoE layer).

At 96 tokens the H100's tuned gate_up tile (16 x 32 x 256, 4 warps) takes 125 registers a thread, so four
programs (16 warps) share an SM, and Nsight Compute saw issue and DRAM both ~60% busy: the decode's dependency
chains are not hidden by enough warps. Capping the registers lets five or six programs in (ptxas spills a few
bytes to L1 instead). This times the whole MoE layer (align, gate_up, down, sum) per variant, each changing one
kernel against the card's selected config, then the best gate_up cap with the best down cap, and checks the
winner against the fp32 reference. Run on the lent GPU:

    PYTHONPATH=src python3 scripts/gpu_moe_registers.py --m 80 96 112 128 --out $OUT/moe_registers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from nvfp4kit.kernels.configs import (
    cache_path,
    card_slug,
    config_to_dict,
    select_moe_config,
    set_cache_dir,
    triton_version,
)
from nvfp4kit.tuning.cases import MOE_SHAPE, MoECase
from nvfp4kit.tuning.timing import time_graph

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, nargs="+", default=[80, 96, 112, 128])
ap.add_argument("--gate-up-caps", type=int, nargs="+", default=[112, 104, 96, 88, 80, 72])
ap.add_argument("--down-caps", type=int, nargs="+", default=[64, 56, 48])
ap.add_argument("--out")
ap.add_argument(
    "--cache-dir",
    help="write each M's winner (when >= 1%% faster than selected) as a tuning cache table here",
)
args = ap.parse_args()
e, k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))


def copy_gbps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_graph(lambda _i: dst.copy_(src), sets=1, calls=4, repeats=5)
    return 2 * src.numel() / us / 1e3


def timed(case: MoECase, cfg) -> float | None:
    try:
        return time_graph(case.call(cfg), sets=4, calls=8, repeats=7)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is reported and skipped
        print(f"  fail {cfg}: {str(exc).splitlines()[0][:120]}", flush=True)
        return None


copy = copy_gbps()
print(f"{torch.cuda.get_device_name()}: device copy {copy:.0f} GB/s", flush=True)
rows = []
winners: dict[str, dict] = {}
for m in args.m:
    case = MoECase.build(m, weight_sets=2, route_sets=4, with_bf16=False)
    base = dataclasses.replace(select_moe_config(m, e, k, h, i, device="cuda"), split=False, path="tiles")
    variants = {"selected": base}
    for cap in args.gate_up_caps:
        variants[f"gate_up cap {cap}"] = dataclasses.replace(base, gate_up_max_registers=cap)
    bk = 128 if base.gate_up_block_k != 128 else 256
    variants[f"gate_up bk {bk}"] = dataclasses.replace(base, gate_up_block_k=bk)
    for cap in (96, 80, 72):
        variants[f"gate_up bk {bk} cap {cap}"] = dataclasses.replace(
            base, gate_up_block_k=bk, gate_up_max_registers=cap
        )
    for cap in args.down_caps:
        variants[f"down cap {cap}"] = dataclasses.replace(base, down_max_registers=cap)
    for cap in (None, 96, 80):
        variants[f"down bn 128 cap {cap}"] = dataclasses.replace(
            base, down_block_n=128, down_max_registers=cap
        )
    times = {}
    for name, cfg in variants.items():
        us = timed(case, cfg)
        if us is not None:
            times[name] = us
            print(f"  M={m} {name:26s} {us:7.1f} us", flush=True)
    gu_best = min((n for n in times if n.startswith("gate_up")), key=times.get, default="selected")
    dn_best = min((n for n in times if n.startswith("down")), key=times.get, default="selected")
    both = dataclasses.replace(
        variants[gu_best],
        down_block_n=variants[dn_best].down_block_n,
        down_max_registers=variants[dn_best].down_max_registers,
    )
    us = timed(case, both)
    if us is not None:
        times["best gate_up + best down"] = us
        variants["best gate_up + best down"] = both
        print(f"  M={m} {'best gate_up + best down':26s} {us:7.1f} us ({gu_best} / {dn_best})", flush=True)
    winner = min(times, key=times.get)
    err_base, err_win = case.error(base), case.error(variants[winner])
    gbps = {n: case.bytes / us / 1e3 for n, us in times.items()}
    for name, us in times.items():
        rows.append(
            {"M": m, "variant": name, "us": round(us, 2), "GBps": round(gbps[name], 1),
             "pct_copy": round(100 * gbps[name] / copy, 1), "config": variants[name].__dict__}
        )  # fmt: skip
    print(f"moe M={m}: selected {times['selected']:.1f} us (err {err_base:.2e}) -> {winner} {times[winner]:.1f} us "
          f"(err {err_win:.2e}, {times['selected'] / times[winner]:.3f}x)", flush=True)  # fmt: skip
    if times["selected"] / times[winner] >= 1.01:
        winners[str(m)] = config_to_dict(variants[winner])
    del case
    torch.cuda.empty_cache()
if args.cache_dir and winners:
    set_cache_dir(args.cache_dir)
    path = cache_path(card_slug("cuda"), triton_version())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"moe": {f"{e}x{k}x{h}x{i}": winners}}, indent=1))
    print(f"winners at M = {', '.join(winners)} written to {path}", flush=True)
print(f"\n{'M':>4} {'variant':28s} {'us':>8} {'GB/s':>7} {'% copy':>7}")
for r in rows:
    print(f"{r['M']:>4} {r['variant']:28s} {r['us']:>8.1f} {r['GBps']:>7.0f} {r['pct_copy']:>7.1f}")
if args.out:
    with open(args.out, "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "copy_GBps": round(copy), "rows": rows}, f, indent=1
        )
