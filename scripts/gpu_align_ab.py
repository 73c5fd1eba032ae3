"""The engine's decode with each one-program MoE align (`kernels/moe_align.py`): atomics (today's) against ranks.

One random all-NVFP4 model of the 26B-A4B shape (FP8 KV, CUDA graphs of the timed batch sizes only, no warm-up);
for each variant named on the command line, in order, a fresh engine whose MoE layers align with that kernel:
greedy tokens of three prompts (must be equal across variants: inside an expert's run the order of pairs changes
no result) and decode tokens/s at each batch. Alternate the variants (`atomic rank atomic rank`) to see the noise.
Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_align_ab.py atomic rank atomic rank [--batches 16 64 112]
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.kernels import moe_align
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model

KERNELS = {"atomic": moe_align._align_triton, "rank": moe_align._align_rank}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", choices=sorted(KERNELS))
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 112])
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    prompts = [runs.random_prompt(cfg, n, seed=s) for s, n in ((1, 37), (2, 700), (3, 300))]
    rows, tokens = [], []
    for variant in args.variants:
        moe_align._align_triton = KERNELS[variant]  # what moe_align(method="triton") calls up to 1,024 pairs
        config = EngineConfig(
            kv_dtype="fp8_e5m2", max_num_seqs=max(args.batches), max_num_batched_tokens=2048,
            num_kv_tokens=max(args.batches) * 700 + 4096, prefix_caching=False, warmup=False,
            prefill_graphs=(), graph_batch_sizes=tuple(sorted(args.batches)),
        )  # fmt: skip
        engine = Engine(model, None, config=config)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        reqs = [engine.requests[engine.add_request(prompt, params)] for prompt in prompts]
        while engine.has_unfinished():
            engine.step()
        tokens.append([list(r.output_ids) for r in reqs])
        for batch in args.batches:
            r = runs.decode_speed(engine, batch=batch, context=512, steps=args.steps)
            row = dict(variant=variant, batch=batch, tokens_per_s=round(r.tokens_per_s, 1),
                       gpu_ms_per_step=round(r.gpu_ms_per_step or 0, 3))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print("greedy tokens equal across variants:", all(t == tokens[0] for t in tokens))
    print("| batch | " + " | ".join(args.variants) + " |\n|---|" + "---|" * len(args.variants))
    for batch in args.batches:
        print(
            f"| {batch} | " + " | ".join(str(r["tokens_per_s"]) for r in rows if r["batch"] == batch) + " |"
        )


if __name__ == "__main__":
    main()
