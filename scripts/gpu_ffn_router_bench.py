"""A MoE layer's FFN inputs and router on the card: one launch (kernels/ffn_router.py) against the two it replaces,
`norms.ffn_inputs` then `router.fused_route`, at the 26B-A4B shape (hidden 2816, 128 experts, top-8, bf16).

Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_ffn_router_bench.py [--tokens 1 2 4]
For each token count the fused results are first checked against the two launches on a few input sets (h, mlp_in,
experts_in and expert ids equal to the bit, the weights within an fp32 ulp; the largest differences are printed
where they are not),
then every variant is timed in CUDA graphs of 20 calls (median of the replays, `tuning/timing.py`), the router
weights rotated through copies larger than L2 as in the model (the activations stay in L2, as they would after
the attention's output projection). Variants: the two launches, each of them alone, and the fused kernel with 1, 2
and 4 experts a program (the model uses 1). Exits 1 when any result differs.
"""

from __future__ import annotations

import argparse

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.kernels import norms, router
from nvfp4kit.kernels.ffn_router import ffn_inputs_routed
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets, time_graph

NAMES = ("h", "mlp_in", "experts_in", "weights", "ids")
PER_PROGRAM = (1, 2, 4)


def make_inputs(t: int, hidden: int, seed: int) -> dict:
    """One token batch's residual, attention output and the layer's norm weights (bf16, on the card)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    norm_weights = {
        name: (1.0 + 0.2 * randn(hidden).float()).to(torch.bfloat16)
        for name in ("post_attn_norm", "mlp_norm", "experts_norm", "router_scale")
    }
    return dict(residual=randn(t, hidden), attn_out=randn(t, hidden, scale=3.0), **norm_weights)


def unfused(x: dict, weight: torch.Tensor, scale: torch.Tensor, top_k: int, eps: float, per: int = 1):
    h, mlp_in, experts_in, router_in = norms.ffn_inputs(**x, eps=eps)
    weights, ids = router.fused_route(router_in, weight, scale, top_k=top_k, experts_per_program=per)
    return h, mlp_in, experts_in, weights, ids


def fused(x: dict, weight: torch.Tensor, scale: torch.Tensor, top_k: int, eps: float, per: int = 1):
    return ffn_inputs_routed(
        **x, router_weight=weight, per_expert_scale=scale, top_k=top_k, eps=eps, experts_per_program=per
    )


def differences(got, want) -> list[str]:
    """What differs between two results, one line per output (empty: equal to the bit)."""
    lines = []
    for name, a, b in zip(NAMES, got, want):
        if torch.equal(a, b):
            continue
        if name == "ids":
            lines.append(f"ids: {int((a != b).any(dim=1).sum())} of {a.shape[0]} tokens pick other experts")
        elif name == "weights" and (a - b).abs().max() <= 2e-7 * b.abs().max():
            continue  # the top-k's normalising sum laid out for the kernel's warps: an fp32 ulp (H100, T >= 2)
        else:
            diff = (a.float() - b.float()).abs()
            lines.append(
                f"{name}: {int((diff > 0).sum())} entries differ, largest by {float(diff.max()):.3e}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--checks", type=int, default=8, help="input sets checked for equality per token count"
    )
    args = parser.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    hidden, experts, top_k, eps = cfg.hidden_size, cfg.num_experts, cfg.top_k_experts, cfg.rms_norm_eps
    card = torch.cuda.get_device_name()
    sets = rotation_sets(experts * hidden * 2, l2_bytes=l2_cache_bytes())
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [
        torch.randn(experts, hidden, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(sets)
    ]
    scale = (torch.rand(experts, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    print(f"{card}: E={experts}, H={hidden}, top-{top_k}, bf16; {sets} router weight copies", flush=True)

    rows, failures = [], []
    for t in args.tokens:
        for per in PER_PROGRAM:  # equality first: a variant that differs is reported, still timed
            for seed in range(args.checks):
                x, w = make_inputs(t, hidden, seed), weights[seed % sets]
                found = differences(
                    fused(x, w, scale, top_k, eps, per), unfused(x, w, scale, top_k, eps, per)
                )
                failures += [f"T={t} experts/program={per} set {seed}: {line}" for line in found]
        x = make_inputs(t, hidden, 100 + t)
        z = norms.ffn_inputs(**x, eps=eps)[3]  # the router input the two launches pass on
        variants = {
            "ffn_inputs alone": lambda i, x=x: norms.ffn_inputs(**x, eps=eps),
            "fused_route alone": lambda i, z=z: router.fused_route(z, weights[i], scale, top_k=top_k),
            "two launches": lambda i, x=x: unfused(x, weights[i], scale, top_k, eps),
        }
        for per in PER_PROGRAM:
            variants[f"fused/{per}"] = lambda i, x=x, per=per: fused(x, weights[i], scale, top_k, eps, per)
        for name, call in variants.items():
            us = time_graph(call, sets=sets, calls=20, repeats=15)
            rows.append((t, name, us))
            print(f"T={t} {name:<18} {us:7.2f} us", flush=True)

    print(
        f"\n{card}: FFN inputs + router, 26B-A4B (E={experts}, H={hidden}, top-{top_k}), us per call in CUDA graphs"
    )
    print(f"{'T':>3}  {'variant':<18}{'us':>8}{'vs two launches':>17}")
    for t, name, us in rows:
        base = next(b for tt, n, b in rows if tt == t and n == "two launches")
        print(f"{t:>3}  {name:<18}{us:>8.2f}{us - base:>+16.2f}")
    if failures:
        print(f"\nfused results differ from the two launches ({len(failures)}):", *failures, sep="\n  ")
    else:
        print(
            f"\nfused results equal the two launches' to the bit ({args.checks} input sets per T and variant)"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
