"""Where a long prefill's time goes: one prompt through the engine (random 26B-A4B NVFP4, FP8 KV) under the torch
profiler, kernels grouped by name, sorted by total GPU time.

Usage on the GPU: PYTHONPATH=src python3 scripts/gpu_prefill_profile.py --context 32768 --chunk 2048
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from nvfp4kit.bench.engine_runs import random_prompt
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    config = EngineConfig(kv_dtype="fp8_e4m3", max_num_seqs=4, max_num_batched_tokens=args.chunk,
                          num_kv_tokens=args.context + 4096, cuda_graphs=False, prefix_caching=False)  # fmt: skip
    engine = Engine(model, None, config=config)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request(random_prompt(cfg, 4096, seed=1), params)  # warm-up: compile every kernel
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    engine.add_request(random_prompt(cfg, args.context, seed=2), params)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name[:60]] += ev.device_time_total / 1000.0
            counts[ev.name[:60]] += 1
    gpu = sum(totals.values())
    print(f"{torch.cuda.get_device_name()}: {args.context}-token prefill, chunk {args.chunk}: wall {wall:.2f} s "
          f"(under the profiler), GPU kernels {gpu / 1000:.2f} s, {args.context / wall:,.0f} tok/s")  # fmt: skip
    print(f"{'kernel':60} {'ms':>9} {'%':>6} {'calls':>7}")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name:60} {ms:9.1f} {100 * ms / gpu:6.1f} {counts[name]:7}")


if __name__ == "__main__":
    main()
