"""Decode launch variants on the card: speed and greedy tokens with PDL modes and the two-stream layer halves.

One random all-NVFP4 model of the 26B-A4B shape (FP8 KV, CUDA graphs); for each variant `P:B[:F[:R]]` (PDL mode P
of kernels/launch.py for every launch, or `d` for the engine's own choice by graph size; B = 1 to run the dense MLP
beside the experts on a second stream, model/branches.py, F = 0 to write K/V with their own launch instead of from
qkv_norm_rope, engine/attention_backend.py; R = 0 to run the MoE router as its own launch after ffn_inputs instead of
inside it, kernels/ffn_router.py; an omitted F or R is the engine's own setting in this process, 1; a fifth field,
G, chose session 15's GEMV-tile gate_up + GeGLU launch, removed in session 37) a fresh engine (its decode graphs
captured under that variant), greedy tokens of two
prompts (must be identical across variants: they change when or where a value is computed, never what; a first
difference at a step whose top-2 logprobs were within TIE_GAP is reported as a near-tie, the sum order flipping it)
and decode tokens/s with GPU ms per step.
Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_decode_variants.py --out OUT [--variants 0:1:0 0:1:1 2:1] [--profile [--profile-batches 1 8]]
  [--expect-tokens EARLIER/decode_variants.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.bench.engine_speed import profile_decode_step
from nvfp4kit.config import load_preset
from nvfp4kit.engine.attention_backend import FUSED_KV_WRITE_VAR, fused_kv_write_enabled
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.kernels import ffn_router
from nvfp4kit.kernels.launch import set_pdl_mode
from nvfp4kit.model.branches import set_branch_streams
from nvfp4kit.plan.weights import weights_from_config
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def greedy_tokens(
    engine: Engine, prompts: list[list[int]], n: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Each prompt's greedy tokens and, per token, the gap between its logprob and the runner-up's."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]  # finished requests leave engine.requests
    gaps: dict[str, list[float]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for event in engine.step():
            top = sorted((lp for _, lp in event.top_logprobs), reverse=True)
            gaps[event.request_id].append(top[0] - top[1] if len(top) > 1 else float("inf"))
    return [list(r.output_ids) for r in reqs], [gaps[i] for i in ids]


# a first divergence at a step whose top-2 logprobs were closer than this is a near-tie: kernels that sum in another
# order may flip it (random weights give many); a wider gap means the variants computed different values
TIE_GAP = 0.02


def compare_tokens(ref: list[list[int]], ref_gaps: list[list[float]], other: list[list[int]]) -> str:
    """ "equal", "near-tie at prompt p step s (gap g)" or "DIFFERENT at prompt p step s (gap g)"."""
    for p, (a, b) in enumerate(zip(ref, other)):
        step = next((s for s, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is not None:
            gap = ref_gaps[p][step] if ref_gaps and step < len(ref_gaps[p]) else float("inf")
            kind = "near-tie" if gap < TIE_GAP else "DIFFERENT"
            return f"{kind} at prompt {p} step {step} (top-2 gap {gap:.4f})"
    return "equal"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["0:1:0", "0:1:1"],
        help="PDL mode:branch streams[:fused KV write[:router in ffn_inputs[:gate_up + GeGLU]]], e.g. 0:1:1:1:0",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--profile", action="store_true", help="kernel table of one decode step per variant")
    p.add_argument("--profile-batches", type=int, nargs="+", default=[1], help="batch sizes --profile covers")
    p.add_argument(
        "--expect-tokens", type=Path, help="an earlier run's decode_variants.json whose greedy tokens must match "
        "(to compare code paths chosen at import, e.g. NVFP4KIT_K_ORDER_DECODE=1, in two processes)",
    )  # fmt: skip
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    weights = weights_from_config(cfg, recipe="all-nvfp4")
    spec = runs.card_spec()
    prompts = [runs.random_prompt(cfg, n, seed=s) for s, n in ((1, 37), (2, 700))]
    rows, tokens, gaps = [], {}, {}
    real_fuses = ffn_router.fuses
    defaults = [int(fused_kv_write_enabled()), 1]  # F, R as the engine runs them
    for variant in args.variants:
        # P = "d": no forced mode, the engine's own choice per graph (kernels/launch.decode_graph_pdl)
        fields = [-1 if v == "d" else int(v) for v in variant.split(":")]
        if not 2 <= len(fields) <= 4:
            p.error(f"variant {variant!r}: P:B[:F[:R]] (the fifth field, G, was removed in session 37)")
        mode, branches, fused_kv, routed = (fields + defaults[max(0, len(fields) - 2) :])[:4]
        ffn_router.fuses = real_fuses if routed else (lambda *_: False)
        set_pdl_mode(None if mode < 0 else mode)
        set_branch_streams(bool(branches))
        os.environ[FUSED_KV_WRITE_VAR] = str(fused_kv)  # read when the decode graphs are captured
        config = EngineConfig(
            kv_dtype="fp8_e5m2", max_num_seqs=max(args.batches), max_num_batched_tokens=2048,
            num_kv_tokens=max(args.batches) * 700 + 4096, prefix_caching=False,
        )  # fmt: skip
        engine = Engine(model, None, config=config)
        tokens[variant], gaps[variant] = greedy_tokens(engine, prompts, 24)
        for batch in args.batches:
            r = runs.decode_speed(engine, batch=batch, context=512, steps=args.steps)
            _, roof = runs.decode_roofline(
                cfg, weights, batch=batch, context=512, kv_dtype="fp8_e5m2",
                bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s,
            )  # fmt: skip
            row = dict(variant=variant, batch=batch, tokens_per_s=round(r.tokens_per_s, 1), ms_per_step=round(r.ms_per_step, 3),
                       gpu_ms_per_step=round(r.gpu_ms_per_step or 0, 3), pct_roofline=round(100 * r.tokens_per_s / roof, 1))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        for batch in args.profile_batches if args.profile else []:
            table = profile_decode_step(engine, batch=batch, top=40)
            print(f"--- variant {variant}\n{table}", file=sys.stderr, flush=True)
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    first = args.variants[0]
    verdicts = {v: compare_tokens(tokens[first], gaps[first], tokens[v]) for v in args.variants[1:]}
    if args.expect_tokens:
        earlier = json.loads(args.expect_tokens.read_text())
        ref, ref_gaps = (
            next(iter(earlier["tokens"].values())),
            next(iter(earlier.get("gaps", {}).values()), []),
        )
        verdicts |= {
            f"{v} vs {args.expect_tokens}": compare_tokens(ref, ref_gaps, tokens[v]) for v in args.variants
        }
    for name, verdict in verdicts.items():
        print(f"greedy tokens, {name}: {verdict}")
    same = not any(v.startswith("DIFFERENT") for v in verdicts.values())
    card = torch.cuda.get_device_name()
    (args.out / "decode_variants.json").write_text(
        json.dumps(
            {
                "card": card,
                "rows": rows,
                "greedy_equal": same,
                "verdicts": verdicts,
                "tokens": tokens,
                "gaps": gaps,
            },
            indent=1,
        )  # fmt: skip
    )
    print(f"\n{card}: greedy tokens equal across variants (near-ties allowed): {same}")
    print("variant batch  tok/s   ms/step  gpu ms  %roof")
    for r in rows:
        print(
            f"{r['variant']:>7} {r['batch']:>5} {r['tokens_per_s']:>8} {r['ms_per_step']:>8} {r['gpu_ms_per_step']:>7} {r['pct_roofline']:>6}"
        )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
