"""Start-up sizing on the GPU: a 24 GB card emulated at the Gemma 4 26B-A4B shape (random NVFP4 weights, FP8 KV).

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_sizing_check.py [--budget 24GiB] [--context 32768]

1. plans the engine from the measured memory and --gpu-memory-budget (`nvfp4kit.engine.sizing`), as `LLM`
   does before loading, and prints the start-up block;
2. caps this process's allocator at the budget (`torch.cuda.set_per_process_memory_fraction`), so any overrun
   of the plan fails loudly with an out-of-memory error;
3. builds the random all-NVFP4 model and the engine from the plan; checks the weights on the GPU against the
   planner (within 1%), the allocated global pool against the plan (>= 400K tokens); runs one long request
   (--context tokens) and a batch decode; compares the peak the run needed with the plan's runtime reserve;
4. checks that a budget too small is refused before anything is allocated.
Prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.sizing import (
    InsufficientMemoryError,
    MemoryOptions,
    measure_device_memory,
    plan_engine_memory,
)
from nvfp4kit.plan.units import GiB, MiB
from nvfp4kit.plan.weights import weights_from_config
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def run_requests(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(ids, params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--context", type=int, default=32_768, help="prompt tokens of the long request")
    ap.add_argument("--eager", action="store_true", help="EngineConfig.cuda_graphs=False")
    args = ap.parse_args()

    cfg = load_preset("gemma-4-26b-a4b")
    planner_weights = weights_from_config(cfg, recipe="all-nvfp4").text_bytes
    config = EngineConfig(kv_dtype="fp8_e5m2", max_num_seqs=args.max_num_seqs, cuda_graphs=not args.eager)
    memory = measure_device_memory("cuda")
    options = MemoryOptions.parse(gpu_memory_budget=args.budget)

    # 4 first: a budget too small is refused from the numbers alone
    allocated_before = torch.cuda.memory_allocated()
    try:
        plan_engine_memory(cfg, weights_bytes=planner_weights, memory=memory, config=config, kv_dtype="fp8_e5m2",
                           options=MemoryOptions(gpu_memory_budget=15 * GiB))  # fmt: skip
        refused = "NOT refused"
    except InsufficientMemoryError as exc:
        refused = f"refused ({str(exc)[:90]}...)"
    assert torch.cuda.memory_allocated() == allocated_before

    plan = plan_engine_memory(
        cfg, weights_bytes=planner_weights, memory=memory, options=options, config=config, kv_dtype="fp8_e5m2"
    )
    print(plan.format(), flush=True)
    torch.cuda.set_per_process_memory_fraction(options.gpu_memory_budget / memory.total_bytes)

    model = random_model(cfg, quantized=True, device="cuda")
    torch.cuda.synchronize()
    weights_gpu = torch.cuda.memory_allocated() - allocated_before
    engine = Engine(model, None, config=dataclasses.replace(config, kv_cache_memory=plan.kv_cache_memory))
    kv_gpu = engine.cache.nbytes()
    block = engine.layout.block_size
    assert engine.pool_tokens == plan.pool.global_tokens // block * block, (engine.pool_tokens, plan.pool)
    torch.cuda.reset_peak_memory_stats()
    base = allocated_before + weights_gpu + kv_gpu  # graphs captured at start-up count as runtime memory

    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(10, cfg.vocab_size, (args.context,), generator=gen).tolist()
    t_long = run_requests(engine, [long_prompt], max_tokens=4)
    short = [
        torch.randint(10, cfg.vocab_size, (256,), generator=gen).tolist() for _ in range(args.max_num_seqs)
    ]
    t_batch = run_requests(engine, short, max_tokens=16)
    peak_runtime = torch.cuda.max_memory_reserved() - base
    peak_total = torch.cuda.max_memory_reserved()

    w_err = weights_gpu / planner_weights - 1
    print(f"\ncard {memory.name}, budget {args.budget}, {args.max_num_seqs} sequences, "
          f"{'eager' if args.eager else 'CUDA graphs'}")  # fmt: skip
    print(f"  {'':34}{'plan':>14}{'measured':>14}")
    print(f"  {'weights, GiB':34}{planner_weights / GiB:>14.3f}{weights_gpu / GiB:>14.3f}  ({w_err:+.2%})")
    print(f"  {'KV cache, GiB':34}{plan.kv_cache_memory / GiB:>14.3f}{kv_gpu / GiB:>14.3f}")
    print(f"  {'global-layer tokens':34}{plan.pool.global_tokens:>14,}{engine.pool_tokens:>14,}")
    print(f"  {'runtime beyond weights+KV, MiB':34}{plan.pool.reserve.total / MiB:>14.0f}{peak_runtime / MiB:>14.0f}"
          f"  (reserve incl. margin {plan.pool.reserve.margin / MiB:.0f} MiB)")  # fmt: skip
    print(
        f"  {'allocator peak, GiB (cap)':34}{options.gpu_memory_budget / GiB:>14.2f}{peak_total / GiB:>14.2f}"
    )
    print(f"  long request {args.context:,} tokens: {t_long:.1f} s; batch {args.max_num_seqs} x 16 tokens: "
          f"{t_batch:.1f} s; budget 15 GiB: {refused}")  # fmt: skip
    ok = abs(w_err) <= 0.01 and engine.pool_tokens >= 400_000 and peak_runtime <= plan.pool.reserve.total
    print("PASS" if ok else "CHECK: see the rows above")


if __name__ == "__main__":
    main()
