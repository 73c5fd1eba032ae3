"""NVFP4 -> BF16 expansion tiles for the prefill linears: the expansion alone (GB/s) and in front of cuBLAS at M=2048.

Issue 15 wants every 26B-A4B W4A16 linear within 1.1x of BF16 cuBLAS from M=1024; at M=2048 the H200 was at
1.08-1.17x (session 4), the difference being the expansion (`kernels/dequant.py`, 8-23 us a linear, ~2.8 TB/s
of the ~4.1 TB/s copy rate). For each dense linear and the MoE's all-expert expansion this times each tile of
TILES (CUDA graphs, weights rotated past the L2), checks it bitwise against the default tile, and prints
us, GB/s (packed + scales read, BF16 written) and the dequantize-then-cuBLAS / cuBLAS ratio at --m tokens.
Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_expand_tiles.py [--m 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nvfp4kit.kernels import dequant
from nvfp4kit.tuning.cases import DENSE_SHAPES, MOE_SHAPE, random_nvfp4
from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes, rotation_sets, time_graph

TILES = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (32, 256, 4), (32, 256, 8), (64, 256, 8), (16, 256, 4),
         (16, 512, 4), (16, 512, 8), (32, 512, 8), (8, 512, 4), (128, 64, 4), (128, 128, 8)]  # fmt: skip


def measure(op: str, n: int, k: int, experts: int | None, m: int, l2: int) -> dict:
    nbytes = (experts or 1) * n * k * 9 // 16
    sets = rotation_sets(nbytes, l2_bytes=l2)
    weights = [random_nvfp4(n, k, experts=experts, seed=s) for s in range(sets)]
    out = torch.empty((experts, n, k) if experts else (n, k), dtype=torch.bfloat16, device="cuda")
    ref = dequant.dequantize_nvfp4(weights[0])
    moved = out.numel() * (2 + 0.5 + 1 / 16)
    row: dict = {"op": op, "shape": list(out.shape), "expand_us": {}, "exact": {}}

    def expand(j: int, tile) -> torch.Tensor:
        return dequant.dequantize_nvfp4(weights[j % sets], out=out, tile=tile)

    for tile in TILES:
        key = "x".join(map(str, tile))
        try:
            expand(0, tile)
            row["exact"][key] = bool(torch.equal(out, ref))
            row["expand_us"][key] = round(time_graph(lambda j, t=tile: expand(j, t), sets=sets), 2)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is reported
            row["expand_us"][key] = f"failed: {str(exc).splitlines()[0][:80]}"
    timed = {t: us for t, us in row["expand_us"].items() if isinstance(us, float) and row["exact"][t]}
    row["best"] = min(timed, key=timed.get)
    row["gbps"] = {t: round(moved / us / 1e3) for t, us in timed.items()}
    if experts:
        return row
    # the linear at M tokens: cuBLAS on BF16 weights vs expansion (default / best tile) + cuBLAS
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dense = ref.clone()
    row["cublas_us"] = round(time_graph(lambda j: F.linear(xs[j % 2], dense), sets=2), 2)
    for name, tile in (("default", dequant.EXPAND_TILE), ("best", tuple(map(int, row["best"].split("x"))))):
        us = time_graph(lambda j, t=tile: F.linear(xs[j % 2], expand(j, t)), sets=sets)
        row[f"{name}_ratio"] = round(us / row["cublas_us"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--json")
    ap.add_argument("--tiles", nargs="+", help="ROWSxCOLSxWARPS tiles to time (default: all of TILES)")
    args = ap.parse_args()
    if args.tiles:
        TILES[:] = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
        if dequant.EXPAND_TILE not in TILES:
            TILES.insert(0, dequant.EXPAND_TILE)
    l2 = l2_cache_bytes()
    copy = copy_bandwidth_gbps()
    e, h, i = (MOE_SHAPE[key] for key in ("experts", "hidden", "inter"))
    cases = {op: (n, k, None) for op, (n, k) in DENSE_SHAPES.items()}
    cases["moe_gate_up_all"] = (2 * i, h, e)
    rows = []
    for op, (n, k, experts) in cases.items():
        rows.append(measure(op, n, k, experts, args.m, l2))
        print(json.dumps({key: v for key, v in rows[-1].items() if key != "exact"}), flush=True)
    card = torch.cuda.get_device_name()
    d = "x".join(map(str, dequant.EXPAND_TILE))
    print(f"\n{card}, copy {copy:.0f} GB/s, M={args.m}")
    print(
        f"{'op':<18} {'default us':>10} {'GB/s':>6} {'best tile':>10} {'us':>7} {'GB/s':>6} {'ratio default':>13} {'ratio best':>10}"
    )
    for r in rows:
        print(f"{r['op']:<18} {r['expand_us'][d]:>10} {r['gbps'].get(d, 0):>6} {r['best']:>10} {r['expand_us'][r['best']]:>7} "
              f"{r['gbps'][r['best']]:>6} {r.get('default_ratio', ''):>13} {r.get('best_ratio', ''):>10}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "copy_gbps": copy, "m": args.m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
