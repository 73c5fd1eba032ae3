"""The vocabulary-wide ops after the lm_head, torch against the Triton kernels of `kernels/logits.py`.

Part 1, the ops alone at Gemma 4's vocabulary (262,144) in CUDA graphs: the softcap (bf16 logits in, fp32 out)
and the greedy pick (fp32 in, token and logprob out), GB/s against the card's copy bandwidth. Part 2, the engine
(random all-NVFP4 26B-A4B, FP8 KV, CUDA graphs of the timed batches): decode tok/s and GPU ms a step with each
variant, alternated (`torch fused torch fused`), the greedy tokens of three prompts compared across variants.
Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_logits_ab.py [--batches 1 16 96] [--context 816]
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_step_timeline import decode_engine  # scripts/ on the path: the same engine as the timeline's

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import load_preset
from nvfp4kit.engine import batch_sampler
from nvfp4kit.kernels import logits as kernels
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.tuning.timing import time_graph

VOCAB = 262_144
FUSED_SOFTCAP = TritonBackend.__dict__["softcap_logits"]  # the staticmethod itself, to put back
FUSED_GREEDY = batch_sampler._fused_greedy


def use(variant: str) -> None:
    if variant == "torch":
        TritonBackend.softcap_logits = lambda self, x, cap, *, out=None: TorchBackend().softcap_logits(
            x, cap, out=out
        )
        batch_sampler._fused_greedy = lambda: None
    else:
        TritonBackend.softcap_logits = FUSED_SOFTCAP
        batch_sampler._fused_greedy = FUSED_GREEDY


def _us(fn, *args, **kwargs) -> float:
    """us a call of fn(*args, **kwargs), 20 calls a CUDA graph."""
    return time_graph(lambda _set: fn(*args, **kwargs), sets=1, calls=20, repeats=5)


def ops_alone(batches: list[int]) -> list[dict]:
    rows = []
    torch_ops = TorchBackend()
    for b in batches:
        raw = torch.randn(b, VOCAB, device="cuda", dtype=torch.bfloat16) * 40
        out = torch.empty(b, VOCAB, device="cuda")
        capped = kernels.softcap_logits(raw, 30.0)
        want = torch_ops.softcap_logits(raw, 30.0)
        soft_err = (capped - want).abs().max().item()
        same = torch.equal(kernels.greedy_table(capped)[:, 0], batch_sampler.greedy_table_torch(capped)[:, 0])
        t_soft = _us(torch_ops.softcap_logits, raw, 30.0, out=out)
        f_soft = _us(kernels.softcap_logits, raw, 30.0, out=out)
        t_pick = _us(batch_sampler.greedy_table_torch, capped)
        f_pick = _us(kernels.greedy_table, capped)
        soft_bytes, pick_bytes = b * VOCAB * 6, b * VOCAB * 4
        row = dict(batch=b, softcap_torch_us=t_soft, softcap_fused_us=f_soft, pick_torch_us=t_pick,
                   pick_fused_us=f_pick, softcap_fused_gbps=soft_bytes / f_soft / 1e3,
                   pick_fused_gbps=pick_bytes / f_pick / 1e3, softcap_max_err=soft_err, same_tokens=same)  # fmt: skip
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def engine_ab(variants: list[str], batches: list[int], context: int, steps: int) -> list[dict]:
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    engine = decode_engine(model, batches, context)
    prompts = [runs.random_prompt(cfg, n, seed=s) for s, n in ((1, 37), (2, 700), (3, 300))]
    rows, tokens = [], []
    for variant in variants:
        use(variant)
        engine.graphs.capture()  # the graphs hold the softcap they were captured with
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        reqs = [engine.requests[engine.add_request(p, params)] for p in prompts]
        while engine.has_unfinished():
            engine.step()
        tokens.append([list(r.output_ids) for r in reqs])
        for batch in batches:
            r = runs.decode_speed(engine, batch=batch, context=context, steps=steps)
            row = dict(variant=variant, batch=batch, tokens_per_s=round(r.tokens_per_s, 1),
                       gpu_ms_per_step=round(r.gpu_ms_per_step or 0, 3))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("greedy tokens equal across variants:", all(t == tokens[0] for t in tokens))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 96])
    p.add_argument("--variants", nargs="+", default=["torch", "fused", "torch", "fused"])
    p.add_argument("--context", type=int, default=816)
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    alone = ops_alone(args.batches)
    rows = engine_ab(args.variants, args.batches, args.context, args.steps)
    print(
        "\n| batch | softcap torch / fused us | pick torch / fused us | " + " | ".join(args.variants) + " |"
    )
    print("|---|---|---|" + "---|" * len(args.variants))
    for a in alone:
        b = a["batch"]
        speeds = " | ".join(f"{r['tokens_per_s']} ({r['gpu_ms_per_step']})" for r in rows if r["batch"] == b)
        print(f"| {b} | {a['softcap_torch_us']:.1f} / {a['softcap_fused_us']:.1f} | {a['pick_torch_us']:.1f} /"
              f" {a['pick_fused_us']:.1f} | {speeds} |")  # fmt: skip


if __name__ == "__main__":
    main()
