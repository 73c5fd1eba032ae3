"""Long-prompt TTFT with and without the pre-rotated derived keys (kernels/rotated_keys.py), one engine, alternating.

26B-A4B shape, random NVFP4 weights, FP8 KV, the card's default chunk; each prompt length runs `--repeats` times
per variant, alternating (variant order flips each round), after one warm-up prompt. Run on the GPU from the root:
  PYTHONPATH=src python3 scripts/gpu_prerotate_ab.py [--prompts 32768 131072] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.kernels import rotated_keys
from nvfp4kit.testing.random_model import random_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kv-dtype", default="fp8_e5m2")
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    longest = max(args.prompts)
    config = EngineConfig(kv_dtype=args.kv_dtype, max_num_seqs=4, max_model_len=longest + 1024,
                          num_kv_tokens=longest + 2048, prefix_caching=False)  # fmt: skip
    engine = Engine(model, None, config=config)
    default_min = rotated_keys.PREROTATE_MIN_KEYS
    variants = {"in-kernel": 1 << 62, "prerotated": default_min}
    for minimum in variants.values():  # compile both paths
        rotated_keys.PREROTATE_MIN_KEYS = minimum
        runs.prefill_speed(engine, prompt_len=16384)
    rows = []
    for prompt in args.prompts:
        for r in range(args.repeats):
            order = list(variants.items()) if r % 2 == 0 else list(reversed(variants.items()))
            for name, minimum in order:
                rotated_keys.PREROTATE_MIN_KEYS = minimum
                res = runs.prefill_speed(engine, prompt_len=prompt)
                row = dict(
                    prompt=prompt,
                    variant=name,
                    ttft_ms=round(res.ttft_ms, 1),
                    tokens_per_s=round(res.tokens_per_s),
                )
                rows.append(row)
                print(row, flush=True)
    rotated_keys.PREROTATE_MIN_KEYS = default_min
    card = torch.cuda.get_device_name()
    print(f"\n{card}: TTFT, the default chunk, {args.kv_dtype} KV")
    for prompt in args.prompts:
        best = {
            n: min(r["ttft_ms"] for r in rows if r["prompt"] == prompt and r["variant"] == n)
            for n in variants
        }
        print(f"{prompt:>7}: " + "  ".join(f"{n} {ms / 1e3:.2f} s" for n, ms in best.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
