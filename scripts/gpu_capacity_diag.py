"""Why do logprobs differ between a small and a huge KV pool? (issue #15's correctness question)

One random 26B-A4B NVFP4 model, one random prompt; engines that differ only in their global pool size (and CUDA
graphs, and the per-process memory cap that `bench capacity` sets). Each run records the prompt's logprobs (every
prefill position) and the greedy tokens' logprobs; runs are compared position by position with the first one,
so a difference is located: from the first chunk (the math differs), at a chunk boundary (KV written or read
differently), or only in decode (graphs / key splits).

Usage on the GPU: PYTHONPATH=src python3 scripts/gpu_capacity_diag.py --context 32768 [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from nvfp4kit.bench.engine_runs import random_prompt
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def run(model, cfg, prompt, *, pool_tokens: int, graphs: bool, chunk: int, cap: float | None, new: int):
    if cap is not None:
        torch.cuda.set_per_process_memory_fraction(cap)
    config = EngineConfig(kv_dtype="fp8_e5m2", max_num_seqs=8, max_num_batched_tokens=chunk,
                          num_kv_tokens=pool_tokens, cuda_graphs=graphs, graph_batch_sizes=(1,),
                          prefix_caching=False)  # fmt: skip
    engine = Engine(model, None, config=config)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(prompt, params)
    prompt_lp, tokens, lps = None, [], []
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.prompt_logprobs is not None:
                prompt_lp = [p.logprob if p is not None else 0.0 for p in ev.prompt_logprobs[1:]]
            tokens.append(ev.token_id)
            lps.append(ev.logprob)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"prompt_lp": torch.tensor(prompt_lp or [0.0]), "tokens": tokens, "lps": lps, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    prompt = random_prompt(cfg, args.context, seed=2024)
    free = torch.cuda.mem_get_info()[0]
    per_token = 5 * 2 * 512  # FP8 bytes per token over the 5 global layers (K=V stored once, 2 KV heads)
    huge = int(free * 0.8 // per_token) // 16 * 16
    small = 1_280_000
    total = torch.cuda.get_device_properties(0).total_memory
    variants = {
        "small_graphs": dict(pool_tokens=small, graphs=True, cap=None),
        "huge_graphs": dict(pool_tokens=huge, graphs=True, cap=None),
        "huge_graphs_again": dict(pool_tokens=huge, graphs=True, cap=None),
        "huge_eager": dict(pool_tokens=huge, graphs=False, cap=None),
        "small_capped_24g": dict(pool_tokens=small, graphs=True, cap=24 * 2**30 / total),
    }
    results = {}
    for name, v in variants.items():
        try:
            results[name] = run(model, cfg, prompt, chunk=args.chunk, new=args.new, **v)
            print(f"{name}: pool {v['pool_tokens']:,} tokens, {results[name]['seconds']:.1f} s, "
                  f"tokens {results[name]['tokens']}", flush=True)  # fmt: skip
        except Exception as exc:  # report and go on with the other variants
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    base_name = next(iter(results))
    base = results[base_name]
    rows = []
    print(f"\ncompared with {base_name}: max |d logprob| over prompt positions, per {args.chunk}-token chunk")
    for name, r in results.items():
        if name == base_name:
            continue
        d = (r["prompt_lp"] - base["prompt_lp"]).abs()
        per_chunk = [round(float(d[i : i + args.chunk].max()), 4) for i in range(0, len(d), args.chunk)]
        over = (d > 1e-2).nonzero()
        first = int(over[0]) + 1 if len(over) else None
        gen = max((abs(a - b) for a, b in zip(r["lps"], base["lps"])), default=0.0)
        row = {"variant": name, "prompt_max": float(d.max()), "first_pos_over_1e-2": first,
               "per_chunk_max": per_chunk, "decode_max": gen, "same_tokens": r["tokens"] == base["tokens"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(f"{args.out}/capacity_diag.json", "w") as f:
            json.dump(
                {"card": torch.cuda.get_device_name(), "context": args.context, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
