"""Where a prefill split differently first changes the numbers: every submodule's output, position by position.

Usage (repository root): PYTHONPATH=src python3 scripts/gpu_chunk_boundary_probe.py [--device cuda]
    [--shape dense] [--dtype fp32] [--prompt 300] [--splits 300 160 128] [--variants triton torch highest]

Session 6 found on the H200 (tiny dense fp32) that a prefill whose second chunk starts at 160 (off the 64-token
tiles) gives other logprobs (4e-3 on the first token) than chunks of 64 or 128, which agree bitwise; on the CPU
every variant agrees to 1e-6. This probe runs the same prompt once per chunk size (`--splits`: tokens a step) and
hooks every submodule of every decoder layer (attention, its projections, the MLP, the router and experts). All
steps of the one request are concatenated per module, so each module's output covers the whole prompt. Against
the first split it prints, in execution order, the first module whose output differs beyond noise and the
positions that differ; the module names the kernel. Attention is recorded beside the modules as
`layers.N.attention.q` (after norm and RoPE), `.k_stored` / `.v_stored` (the step's rows as the KV pool holds
them) and `.out`. Variants: `triton` (default backends), `torch` (torch
attention backend), `highest` (no TF32 anywhere in torch's fp32 matmuls).

Session 9 found the cause: up to then the model was loaded without a dtype, and on CUDA that means bf16 whatever
the checkpoint holds, so the "fp32" runs were bf16 runs (every sliding attention launch 2.5e-3 off float64, the
size of bf16 rounding, landing on other tile boundaries per chunking). `--dtype` now reaches the model too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.engine import EngineConfig
from nvfp4kit.model.layers import attention
from nvfp4kit.testing.tiny import write_tiny_checkpoint

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", default="cuda")
ap.add_argument("--shape", default="dense", choices=["moe", "dense"])
ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
ap.add_argument("--prompt", type=int, default=300, help="prompt tokens")
ap.add_argument(
    "--splits", type=int, nargs="+", default=[300, 160, 128], help="prefill tokens a step; first = reference"
)
ap.add_argument("--variants", nargs="+", default=["triton", "torch", "highest"])
ap.add_argument("--tolerance", type=float, default=1e-4, help="relative difference that counts as a change")
ap.add_argument("--out", default=None, help="write the findings as JSON here")
args = ap.parse_args()

dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
folder = write_tiny_checkpoint(
    tempfile.mkdtemp(), shape=args.shape, dtype=dtype, max_position_embeddings=4096
)
prompt = torch.randint(10, 300, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()


exactness: dict[tuple[int, int], list[dict]] = defaultdict(list)


def sliding_exactness(ctx, layer, q, k, v, out, window, plain_attend) -> dict:
    """A sliding layer's kernel output against float64 attention over the keys the ring holds, and against a
    second launch on the same inputs (a race shows as a difference between two launches)."""
    cache, seq = ctx.cache, ctx.seqs[0]
    src = ctx.cfg.kv_source_layer(layer)
    positions = ctx.positions[: q.shape[0]]
    hist = torch.arange(max(0, int(positions[0]) - window + 1), int(positions[-1]) + 1, device=q.device)
    slots = cache.ring_slots(seq.ring, hist)
    keys, values = cache.keys[src][slots].double(), cache.values[src][slots].double()
    ref = attention(q.double(), keys, values, q_positions=positions, k_positions=hist, window=window)
    again = plain_attend(ctx, layer, q, k, v, window=window)
    scale = ref.abs().max().clamp_min(1e-12)
    err = ((out.double() - ref).abs().amax(dim=(1, 2)) / scale).cpu()
    worst = torch.topk(err, min(6, err.numel())).indices.tolist()
    return {
        "step_start": int(positions[0]),
        "tokens": int(q.shape[0]),
        "max_err_vs_float64": float(err.max()),
        "worst_positions": [int(positions[i]) for i in worst],
        "repeat_max_diff": float((again - out).abs().max()),
    }


def run(chunk: int, backend: str | None) -> tuple[dict[str, torch.Tensor], list[str], float]:
    """Every layer submodule's output over the whole prompt (steps concatenated), their first-call order, and
    the first sampled token's logprob."""
    config = EngineConfig(prefix_caching=False, max_num_batched_tokens=chunk, attention_backend=backend)
    outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    order: list[str] = []
    with LLM(
        folder, dtype=dtype, device=args.device, engine_config=config, gpu_memory_utilization=0.3
    ) as llm:

        def hook(name):
            def keep(module, inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                if isinstance(out, torch.Tensor) and out.dim() >= 1:
                    if name not in outputs:
                        order.append(name)
                    outputs[name].append(out.detach().float().reshape(out.shape[0], -1).cpu())

            return keep

        handles = [
            module.register_forward_hook(hook(name))
            for name, module in llm.engine.model.named_modules()
            if name.startswith("layers.") and name.count(".") >= 1
        ]
        # what no module hook sees: attention's q (after norm + RoPE), the K/V rows the step stored, its output
        attention = select_attention_backend(llm.engine.device, backend)
        plain_attend = attention.attend

        def attend(ctx, layer, q, k, v, *, window):
            out = plain_attend(ctx, layer, q, k, v, window=window)
            cache, meta = ctx.cache, ctx.metadata
            slots = meta.ring_slots if ctx.cfg.is_sliding(layer) else meta.global_slots
            src = ctx.cfg.kv_source_layer(layer)
            parts = {"q": q, "v_stored": cache.values[src][slots], "out": out}
            if cache.keys[src] is not None:
                parts["k_stored"] = cache.keys[src][slots]
            for kind, tensor in parts.items():
                hook(f"layers.{layer}.attention.{kind}")(None, None, tensor)
            if ctx.cfg.is_sliding(layer) and cache.keys[src] is not None and len(ctx.seqs) == 1:
                exactness[(chunk, layer)].append(
                    sliding_exactness(ctx, layer, q, k, v, out, window, plain_attend)
                )
            return out

        attention.attend = attend
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=0)
        llm.engine.add_request(list(prompt), params)
        logprob = 0.0
        while llm.engine.has_unfinished():
            for event in llm.engine.step():
                logprob = event.logprob
        for handle in handles:
            handle.remove()
        del attention.attend  # the class's method again
    return {name: torch.cat(parts) for name, parts in outputs.items()}, order, logprob


findings = []
for variant in args.variants:
    backend = "torch" if variant == "torch" else None
    if variant == "highest":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    ref, order, ref_logprob = run(args.splits[0], backend)
    for chunk in args.splits[1:]:
        other, _, logprob = run(chunk, backend)
        first = None
        for name in order:
            a, b = ref[name], other.get(name)
            if b is None or a.shape != b.shape:
                continue
            scale = a.abs().max().clamp_min(1e-6)
            per_row = (a - b).abs().amax(dim=1) / scale
            rows = torch.nonzero(per_row > args.tolerance).flatten().tolist()
            if rows:
                first = {
                    "module": name,
                    "rel_diff": float(per_row.max()),
                    "positions": rows[:12],
                    "count": len(rows),
                }
                break
        findings.append({"variant": variant, "split": chunk, "reference_split": args.splits[0],
                         "dlogprob": abs(logprob - ref_logprob), "first_difference": first})  # fmt: skip

name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device.startswith("cuda") else "cpu"
print(
    f"\n{name}, tiny {args.shape} {args.dtype}, prompt {args.prompt}: prefill split vs one of {args.splits[0]}"
)
print(f"{'variant':8} {'split':>5} {'|dlogprob|':>10}  first differing module (rel diff, positions)")
for f in findings:
    first = f["first_difference"]
    where = (
        "none"
        if first is None
        else f"{first['module']} ({first['rel_diff']:.1e}, {first['count']} rows: {first['positions']})"
    )
    print(f"{f['variant']:8} {f['split']:5} {f['dlogprob']:10.2e}  {where}")
print(
    "\nsliding attention launches: error against float64 over the ring's keys, and a repeat launch's difference"
)
for (chunk, layer), rows in sorted(exactness.items()):
    for r in rows:
        print(
            f"  split {chunk:4} layer {layer} step at {r['step_start']:4} ({r['tokens']:3} tokens): "
            f"err {r['max_err_vs_float64']:.1e} at {r['worst_positions']}, repeat diff {r['repeat_max_diff']:.1e}"
        )
if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            {
                "card": name,
                "args": vars(args),
                "findings": findings,
                "exactness": [
                    {"split": c, "layer": n, **r} for (c, n), rows in sorted(exactness.items()) for r in rows
                ],
            },
            fh,
            indent=1,
        )
