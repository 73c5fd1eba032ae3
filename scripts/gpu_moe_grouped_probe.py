"""The expert-grouped fragment MoE (`kernels/moe_frag_grouped.py`) against the engine's MoE path at decode batch
sizes (issue 14: batch 16 / 64 decode, issue 17: concurrency 100).

The 26B-A4B MoE layer (128 experts of 704, top-8, hidden 2,816) at M tokens: `fused_moe` as the engine runs it
(tuned table or heuristic, or `moe_frag` up to NVFP4KIT_FRAG_GEMV tokens) and `fused_moe_grouped` with each
(gate_up warps, down warps) config, both checked against fp32 math, timed in CUDA graphs over 16 routings (the
layer's 429 MB of experts do not fit the L2). GB/s counts the packed bytes of the experts the routing touches.
Prints a table last. Run from the repository root on the GPU machine:
  PYTHONPATH=src python3 scripts/gpu_moe_grouped_probe.py [--m 8 16 32 64 96 128] [--configs g2x2:d1x4:b8:t11:u2 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.tuning.cases import MoECase, rel_error
from nvfp4kit.tuning.timing import time_graph

# ((gate_up warps splitting K, row groups), (down warps splitting K, row groups), pairs a block); session 19 on the
# H100: (2, 2), (1, 4), 8 (the default) the best at 8, 16 and 64 tokens
# (gate_up warps splitting K x row groups, down's, pairs a block, MMA tiles a row group of (gate_up, down)); session
# 21 on the H100: (2, 2), (1, 4), 8, (2, 2) the best at 32-128 tokens, four tiles 2-4% slower than two. Session 22
# (H100, 16 / 32 / 64 tokens): the GeGLU activations stored in the down kernel's load order (removed since) took
# 154.7 / 199.5 / 227.9 us against 151.4 / 198.6 / 226.3 in K order; blocks of 16 170-254 us
CONFIGS = ["g2x2:d1x4:b8:t11", "g2x2:d1x4:b8:t22", "g2x2:d2x2:b8:t22", "g2x2:d1x4:b16:t22"]
BLOCK_DEFAULT = 8
EXPERT_BYTES = (2 * 704 * 2816 + 2816 * 704) * 9 // 16


def parse_config(text: str) -> dict:
    """ "g2x2:d1x4:b8:t11:u2" -> `fused_moe_grouped`'s keyword arguments: gate_up warps (K x row groups), down
    warps, pairs a block, MMA tiles of (gate_up, down), gate_up's K-loop unroll."""
    fields = dict((f[0], f[1:]) for f in text.split(":"))
    gw, dw = (tuple(int(v) for v in fields[k].split("x")) for k in "gd")
    return dict(
        gate_up_warps=gw, down_warps=dw, block=int(fields.get("b", BLOCK_DEFAULT)),
        tiles=tuple(int(v) for v in fields.get("t", "11")), unroll=int(fields.get("u", 1)),
    )  # fmt: skip


def measure(m: int, configs: list[str]) -> dict:
    case = MoECase.build(m, weight_sets=1, route_sets=16, with_bf16=False)
    gu, dn = case.gate_up[0], case.down[0]
    ids, weights = case.routes[0]
    ref = TorchBackend().moe(case.xs[0].float(), ids, weights.float(), gu, dn)
    touched = sum(int(torch.unique(r[0]).numel()) for r in case.routes) / len(case.routes)
    row: dict = {"m": m, "experts_touched": touched, "mb": touched * EXPERT_BYTES / 1e6}
    row["engine_error"] = rel_error(case.call(None)(0), ref)
    row["engine"] = time_graph(case.call(None), sets=16)
    for name in configs:
        kwargs = parse_config(name)

        def run(i, kwargs=kwargs):
            ids, weights = case.routes[i % 16]
            return fused_moe_grouped(case.xs[i % 16], ids, weights, gu, dn, **kwargs)

        try:
            err = rel_error(run(0), ref)
            row[name] = time_graph(run, sets=16) if err < 2e-2 else f"error {err:.2e}"
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            row[name] = f"failed: {str(exc).splitlines()[0][:100]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[8, 16, 32, 64, 96, 128])
    ap.add_argument("--json")
    ap.add_argument(
        "--configs", nargs="+", default=CONFIGS,
        help="g<K warps>x<row groups>:d<K warps>x<row groups>[:b<pairs a block>][:t<gate_up tiles><down tiles>][:u<gate_up unroll>]",
    )  # fmt: skip
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}")
    rows = []
    for m in args.m:
        r = measure(m, args.configs)
        rows.append(r)
        print(f"M={m} engine {r['engine']:.1f} us (err {r['engine_error']:.1e}) | " + "  ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k[0] == "g"), flush=True)  # fmt: skip
    print("\n| M | experts touched | MB | engine us (GB/s) | grouped best us (config) | GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        timed = sorted((v, k) for k, v in r.items() if k[0] == "g" and isinstance(v, float))
        best, name = timed[0] if timed else (float("nan"), "none")
        print(f"| {r['m']} | {r['experts_touched']:.0f} | {r['mb']:.0f} | {r['engine']:.1f} ({r['mb'] / r['engine'] * 1e3:.0f}) | "
              f"{best:.1f} ({name}) | {r['mb'] / best * 1e3:.0f} | {r['engine'] / best:.2f}x |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
