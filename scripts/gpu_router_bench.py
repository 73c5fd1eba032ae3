"""The MoE router on the card: the fused one-launch router against cuBLAS GEMV + `route`, 26B-A4B shape.

Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_router_bench.py [--tokens 1 4 16]
Each variant is checked against the two-step path (same expert ids, weights within 1e-6), then timed in CUDA graphs
of 20 calls (router weights rotated through copies larger than L2), as `nvfp4kit bench kernels` times.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from nvfp4kit.kernels.router import fused_route, route
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets, time_graph

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
args = ap.parse_args()
experts, hidden, top_k = 128, 2816, 8
sets = rotation_sets(experts * hidden * 2, l2_bytes=l2_cache_bytes())
weights = [torch.randn(experts, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
scale = torch.rand(experts, device="cuda") + 0.5
rows = []
for t in args.tokens:
    z = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    ref_w, ref_ids = route(F.linear(z, weights[0]), scale, top_k=top_k)
    variants = {"gemv+route": lambda i, z=z: route(F.linear(z, weights[i]), scale, top_k=top_k)}
    for per in (1, 2, 4):
        variants[f"fused/{per}"] = lambda i, z=z, per=per: fused_route(
            z, weights[i], scale, top_k=top_k, experts_per_program=per
        )
    for name, call in variants.items():
        w, ids = call(0)
        ok = torch.equal(ids, ref_ids) and float((w - ref_w).abs().max()) < 1e-6
        us = time_graph(call, sets=sets, calls=20, repeats=9)
        rows.append((t, name, us, ok))
        print(f"T={t:3} {name:12} {us:7.2f} us  same experts: {ok}", flush=True)
print(f"\n{torch.cuda.get_device_name()}: router (E={experts}, H={hidden}, top-{top_k}), us per call")
for t, name, us, ok in rows:
    print(f"T={t:3} {name:12} {us:7.2f}{'' if ok else '  MISMATCH'}")
