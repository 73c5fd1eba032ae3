"""Prefix caching on the card: the same greedy chat with and without the cache, token by token with logprobs.

Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_prefix_cache_check.py [--shape dense]
    [--dtype bf16] [--highest-precision] [--attention-backend torch] [--chunks 128 64 160]
Tiny random checkpoint (MoE by default; dense has no router choice to flip), CUDA graphs, 4 turns of 150 random user tokens and 24 greedy tokens. Prints per turn
the cached tokens, the first position where the two runs pick different tokens, and the largest logprob
difference before it (noise is ~1e-6 in fp32; a bug shows as a large jump). The same comparison between two runs
without the cache that only chunk the prefill differently (the first of `--chunks` against each other one) tells
the cache's share apart from what chunking alone changes. Session 6 on the H200 (dense, fp32): chunks of 64 and 128
bitwise equal, the cache and chunks of 160 (starting off a 64-token boundary) 4e-3 off on the first token;
`--highest-precision` (no TF32 in cuBLAS) and `--attention-backend torch` are the next two runs to name the cause;
`scripts/gpu_chunk_boundary_probe.py` runs both and names the first submodule whose output changes.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.engine.engine import EngineConfig
from nvfp4kit.testing.tiny import write_tiny_checkpoint

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
ap.add_argument("--turns", type=int, default=4)
ap.add_argument("--shape", default="moe", choices=["moe", "dense"])
ap.add_argument("--chunks", type=int, nargs="+", default=[128, 64, 160], help="prefill tokens a step")
ap.add_argument("--highest-precision", action="store_true", help="fp32 matmuls without TF32 anywhere")
ap.add_argument("--attention-backend", choices=["triton", "torch"], default=None)
args = ap.parse_args()
if args.highest_precision:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
folder = write_tiny_checkpoint(
    tempfile.mkdtemp(), shape=args.shape, dtype=dtype, max_position_embeddings=4096
)


def chat(
    cache: bool, forced: list[list[int]] | None, chunk: int
) -> tuple[list[list[tuple[int, float]]], list[int]]:
    """Each turn's (token, logprob); with `forced`, later turns' histories use those replies (same prompts)."""
    config = EngineConfig(
        prefix_caching=cache, max_num_batched_tokens=chunk, attention_backend=args.attention_backend
    )
    gen = torch.Generator().manual_seed(0)
    history, turns, cached = [2], [], []
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    with LLM(folder, dtype=dtype, device="cuda", engine_config=config, gpu_memory_utilization=0.3) as llm:
        for turn in range(args.turns):
            history += torch.randint(10, 300, (150,), generator=gen).tolist()
            rid = llm.engine.add_request(list(history), params)
            out, hit = [], 0
            while llm.engine.has_unfinished():
                for e in llm.engine.step():
                    if e.request_id == rid:
                        out.append((e.token_id, e.logprob))
                        hit = max(hit, e.cached_tokens or 0)
            turns.append(out)
            cached.append(hit)
            history += forced[turn] if forced else [t for t, _ in out]
    return turns, cached


first, *others = args.chunks
off, _ = chat(False, None, first)
replies = [[t for t, _ in turn] for turn in off]
on, cached = chat(True, replies, first)
runs = [(f"cache on vs off, chunks of {first}", on, cached)]
runs += [(f"no cache, chunks of {c} vs {first}", chat(False, replies, c)[0], [0] * len(off)) for c in others]
print(
    f"{torch.cuda.get_device_name()} {args.shape} {args.dtype}: turn, cached tokens, first differing token, max |dlogprob| before"
)
for label, other, hits in runs:
    print(label)
    for i, (a, b) in enumerate(zip(other, off)):
        first_diff = next((j for j, (x, y) in enumerate(zip(a, b)) if x[0] != y[0]), None)
        upto = len(a) if first_diff is None else first_diff
        diff = max((abs(x[1] - y[1]) for x, y in zip(a[:upto], b[:upto])), default=0.0)
        print(f"  turn {i}: cached {hits[i]:4}  first difference {first_diff}  max dlogprob {diff:.2e}")
