"""Engine end to end on the GPU at the real Gemma 4 26B-A4B shape (random weights): decode and prefill speed.

Run on the lent GPU:  python scripts/gpu_engine.py --out $OUT/engine.json
Builds a random all-NVFP4 model (the seed's recipe) on the GPU, then the same shape in BF16 as the baseline,
and times the engine's steps: batch-1/N decode tokens/s and an 8K prefill. Prints a short table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.plan.weights import weights_from_config
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.buffers() if t is not None) + sum(
        p.numel() * p.element_size() for p in model.parameters()
    )


def decode_speed(engine: Engine, *, batch: int, prompt_len: int, steps: int) -> dict:
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(
            torch.randint(10, engine.model.config.vocab_size, (prompt_len,), generator=gen).tolist(), params
        )
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()  # prefill (and the first token)
    engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "tokens_per_s": batch * steps / dt,
        "ms_per_step": 1e3 * dt / steps,
    }


def prefill_speed(engine: Engine, *, prompt_len: int) -> dict:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request(torch.randint(10, engine.model.config.vocab_size, (prompt_len,)).tolist(), params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"batch": 1, "prompt_len": prompt_len, "tokens_per_s": prompt_len / dt, "ttft_ms": 1e3 * dt}


def profile_decode_step(engine: Engine) -> str:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request([10 + i % 200 for i in range(512)], params)
    for _ in range(3):
        engine.step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)


def run_variant(cfg, *, quantized: bool, args) -> dict:
    model = random_model(cfg, quantized=quantized, device="cuda")
    wbytes = weight_bytes(model)
    econf = EngineConfig(
        kv_dtype="fp8_e5m2", max_num_seqs=64, max_num_batched_tokens=args.chunk, num_kv_tokens=200_000
    )
    engine = Engine(model, None, config=econf)
    rows = {"weights_bytes": wbytes, "decode": [], "prefill": []}
    decode_speed(engine, batch=1, prompt_len=64, steps=4)  # warm-up: compile every kernel once
    for batch in args.batches:
        rows["decode"].append(decode_speed(engine, batch=batch, prompt_len=args.prompt, steps=args.steps))
        print(("nvfp4" if quantized else "bf16"), rows["decode"][-1], flush=True)
    rows["prefill"].append(prefill_speed(engine, prompt_len=args.prefill))
    print(("nvfp4" if quantized else "bf16"), rows["prefill"][-1], flush=True)
    if args.profile and quantized:
        rows["profile"] = profile_decode_step(engine)
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine.json")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    result = {
        "card": torch.cuda.get_device_name(),
        "planner_weights_bytes": weights_from_config(cfg).text_bytes,
    }
    result["nvfp4"] = run_variant(cfg, quantized=True, args=args)
    if not args.skip_bf16:
        result["bf16"] = run_variant(cfg, quantized=False, args=args)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(result["nvfp4"].pop("profile", ""))
    print(
        f"card {result['card']}; weights on GPU {result['nvfp4']['weights_bytes'] / 2**30:.3f} GiB, "
        f"planner {result['planner_weights_bytes'] / 2**30:.3f} GiB"
    )
    for name in ("nvfp4", "bf16"):
        if name not in result:
            continue
        for row in result[name]["decode"]:
            print(
                f"{name:6} decode batch {row['batch']:3}: {row['tokens_per_s']:8.1f} tok/s ({row['ms_per_step']:.2f} ms/step)"
            )
        for row in result[name]["prefill"]:
            print(
                f"{name:6} prefill {row['prompt_len']}: {row['tokens_per_s']:8.0f} tok/s (ttft {row['ttft_ms']:.0f} ms)"
            )


if __name__ == "__main__":
    main()
