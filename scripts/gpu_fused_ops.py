"""Fused element-wise regions on the GPU at the Gemma 4 26B-A4B shapes: correctness, then time against plain torch.

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_fused_ops.py [--out $OUT/fused_ops.json]
  1. every fused op (triton backend, bf16 inputs) against the torch backend on fp32 copies of the same inputs
     (bound 1e-2 relative; routing: the chosen experts must carry the reference's top-k probabilities);
  2. each op timed in CUDA graphs (20 launches a graph, median of 15 replays, `tuning/timing.py`) against the same
     math in plain torch ops (the torch backend on the same bf16 inputs: what the model ran before), M = 1, 16, 512;
  3. one sliding and one global decoder layer of the real shape (random NVFP4 weights), fused regions against
     torch regions (the same NVFP4 linears and fused MoE in both): kernels per layer (torch.profiler) and layer
     time in CUDA graphs. Attention is a stand-in in both (one SDPA over a fixed 256-token history).
Prints the tables last. On a CPU (TRITON_INTERPRET=1) `--check-only` runs the correctness part at M = 1, 3 (small layers).
The correctness part is also a test: tests/gpu/test_fused_ops_26b_shapes.py (`pytest -m cuda`) uses these cases.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nvfp4kit.config import FULL, SLIDING, load_preset
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.layers import rope_inv_freq
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.tuning.cases import rel_error

CFG = load_preset("gemma-4-26b-a4b")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16, EPS, BOUND, LAYER_BOUND = torch.bfloat16, CFG.rms_norm_eps, 1e-2, 5e-2
TRITON, TORCH = TritonBackend(), TorchBackend()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(BF16)


def norm_weight(n: int, seed: int) -> torch.Tensor:
    return (1.0 + 0.2 * randn(n, seed=seed).float()).to(BF16)


def qkv_case(sliding: bool) -> Callable[[int, int], dict]:
    heads, d = CFG.num_attention_heads, CFG.head_dim if sliding else CFG.global_head_dim
    kv_heads = CFG.num_key_value_heads if sliding else CFG.num_global_key_value_heads
    v_proj = sliding or not CFG.attention_k_eq_v
    rope = CFG.rope_sliding if sliding else CFG.rope_full

    def make(m: int, seed: int) -> dict:
        width = (heads + kv_heads * (2 if v_proj else 1)) * d
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return dict(qkv=randn(m, width, seed=seed, scale=3.0), positions=torch.randint(0, 131_072, (m,), generator=gen,
                    device=DEVICE), inv_freq=rope_inv_freq(rope, d).to(DEVICE), q_norm=norm_weight(d, seed + 1),
                    k_norm=norm_weight(d, seed + 2), num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                    v_proj=v_proj, eps=EPS)  # fmt: skip

    return make


@dataclass(frozen=True)
class OpCase:
    name: str
    make: Callable[[int, int], dict]  # (M, seed) -> keyword arguments of the op, bf16 on the device
    method: str  # the FusedRegions method
    positional: tuple[str, ...] = ()  # arguments passed by position, in order


H, E = CFG.hidden_size, CFG.num_experts
CASES = [
    OpCase("rms_norm", lambda m, s: dict(x=randn(m, H, seed=s, scale=4), weight=norm_weight(H, s + 1), eps=EPS),
           "rms_norm", ("x", "weight")),
    OpCase("ffn_inputs", lambda m, s: dict(residual=randn(m, H, seed=s), attn_out=randn(m, H, seed=s + 1, scale=4),
           post_attn_norm=norm_weight(H, s + 2), mlp_norm=norm_weight(H, s + 3), experts_norm=norm_weight(H, s + 4),
           router_scale=norm_weight(H, s + 5), eps=EPS), "ffn_inputs", ("residual", "attn_out")),
    OpCase("ffn_tail", lambda m, s: dict(h=randn(m, H, seed=s), mlp_out=randn(m, H, seed=s + 1, scale=0.3),
           experts_out=randn(m, H, seed=s + 2, scale=0.1), post_norm=norm_weight(H, s + 3),
           post_mlp_norm=norm_weight(H, s + 4), post_experts_norm=norm_weight(H, s + 5),
           layer_scalar=norm_weight(1, s + 6), next_norm=norm_weight(H, s + 7), eps=EPS), "ffn_tail",
           ("h", "mlp_out", "experts_out")),
    OpCase("qkv_norm_rope_sliding", qkv_case(True), "qkv_norm_rope", ("qkv",)),
    OpCase("qkv_norm_rope_global", qkv_case(False), "qkv_norm_rope", ("qkv",)),
    OpCase("geglu", lambda m, s: dict(gate_up=randn(m, 2 * CFG.intermediate_size, seed=s, scale=2)), "geglu",
           ("gate_up",)),
    OpCase("route", lambda m, s: dict(logits=randn(m, E, seed=s, scale=2), per_expert_scale=norm_weight(E, s + 1),
           top_k=CFG.top_k_experts), "route", ("logits", "per_expert_scale")),
]  # fmt: skip


def call(backend, case: OpCase, kwargs: dict, *, fp32: bool = False):
    if fp32:
        kwargs = {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()
        }
    args = [kwargs[k] for k in case.positional]
    rest = {k: v for k, v in kwargs.items() if k not in case.positional}
    return getattr(backend, case.method)(*args, **rest)


def check(case: OpCase, m: int) -> float:
    """Worst relative error of the fused op against the fp32 torch reference (routing: see the module doc)."""
    kwargs = case.make(m, 0)
    out, ref = call(TRITON, case, kwargs), call(TORCH, case, kwargs, fp32=True)
    if case.method == "route":
        (weights, ids), (ref_weights, _) = out, ref
        probs = torch.softmax(kwargs["logits"].float(), dim=-1)
        picked = probs.gather(1, ids).sort(dim=-1, descending=True).values
        ref_top = probs.topk(ids.shape[1], dim=-1).values
        return max(
            rel_error(picked, ref_top), rel_error(weights.sort(-1).values, ref_weights.sort(-1).values)
        )
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    return max(rel_error(o, r) for o, r in zip(outs, refs) if r is not None)


def time_op(backend, case: OpCase, m: int) -> float:
    from nvfp4kit.tuning.timing import time_graph

    sets = [case.make(m, 10 * i) for i in range(2)]
    return time_graph(lambda i: call(backend, case, sets[i]), sets=len(sets))


# ---- whole decoder layers --------------------------------------------------------------------------------


class KernelsWithoutRegions:
    """The triton backend's linears and fused MoE, with the element-wise regions in torch (the model before)."""

    name = "triton-linears-only"

    def __init__(self) -> None:
        self.linear, self.moe = TRITON.linear, TRITON.moe


class FixedHistory:
    """An attention context over a fixed random 256-token K/V history per layer: the same cost in both variants,
    nothing written, so a layer can be captured in a CUDA graph."""

    def __init__(self, cfg, m: int, history: int = 256):
        self.positions = torch.arange(history, history + m, device=DEVICE)
        self.kv = {}
        for layer in range(cfg.num_hidden_layers):
            shape = (cfg.layer_kv_heads(layer), history, cfg.layer_head_dim(layer))
            self.kv[layer] = (randn(*shape, seed=layer), randn(*shape, seed=layer + 100))

    def attend(self, layer, q, k, v, *, window):
        keys, values = self.kv[layer]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, scale=1.0, enable_gqa=True)
        return out.transpose(0, 1)


def kernels_per_call(fn: Callable[[], object]) -> int:
    """GPU kernels (and memsets/copies) one call launches, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    device = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    launches = sum(1 for e in prof.events() if "LaunchKernel" in e.name)
    return device or launches


def measure_layer(layer, x: torch.Tensor, ctx: FixedHistory, *, timing: bool) -> dict:
    """The layer's output, and with `timing` its kernels per call and its time in CUDA graphs."""
    from nvfp4kit.tuning.timing import time_graph

    with torch.no_grad():
        result = {"out": layer(x, ctx)}
        if timing:
            try:
                result["kernels"] = kernels_per_call(lambda: layer(x, ctx))
                result["us"] = time_graph(lambda i: layer(x, ctx), sets=1, calls=5, repeats=10)
            except Exception as exc:  # report the op tables even if a layer cannot be captured
                print(f"layer timing failed: {type(exc).__name__}: {exc}", flush=True)
                result.setdefault("kernels", -1)
                result["us"] = float("nan")
    return result


def attention_kernels(ctx: FixedHistory, layer: int, q: torch.Tensor) -> int:
    with torch.no_grad():
        return kernels_per_call(lambda: ctx.attend(layer, q, None, None, window=None))


def layer_config(*, small: bool):
    """One sliding and one global layer of 26B-A4B (small: the same structure at interpreter-friendly sizes)."""
    cfg = CFG.with_(num_hidden_layers=2, layer_types=(SLIDING, FULL), vocab_size=1024)
    if small:
        cfg = cfg.with_(hidden_size=176, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                        num_global_key_value_heads=1, head_dim=32, global_head_dim=64, num_experts=12,
                        top_k_experts=3, moe_intermediate_size=48)  # fmt: skip
    return cfg


def layer_rows(ms: list[int], *, timing: bool) -> list[dict]:
    cfg = layer_config(small=DEVICE.type != "cuda")
    model = random_model(cfg, quantized=True, dtype=BF16, device=DEVICE, backend=TRITON, seed=1)
    variants = {"fused": TRITON, "torch": KernelsWithoutRegions()}
    rows = []
    for index, kind in enumerate(("sliding", "global")):
        for m in ms:
            ctx, x = FixedHistory(cfg, m), randn(m, cfg.hidden_size, seed=m)
            row, outs = {"layer": kind, "M": m}, {}
            for name, backend in variants.items():
                model.set_backend(backend)
                result = measure_layer(model.layers[index], x, ctx, timing=timing)
                outs[name] = result.pop("out")
                row.update({f"{name}_{key}": value for key, value in result.items()})
            row["rel_err"] = rel_error(outs["fused"], outs["torch"])
            per_token = [rel_error(f, t) for f, t in zip(outs["fused"], outs["torch"])]
            row["token_rel_err_median"] = float(torch.tensor(per_token).median())
            if timing:
                q = randn(m, cfg.num_attention_heads, cfg.layer_head_dim(index), seed=0)
                row["attention_kernels"] = attention_kernels(ctx, index, q)
            rows.append(row)
    model.set_backend(TRITON)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--check-only", action="store_true", help="correctness only (works on the CPU)")
    args = parser.parse_args()
    timing = DEVICE.type == "cuda" and not args.check_only
    ms = [1, 16, 512] if timing else [1, 3]
    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (interpreter)"

    failures, op_rows = [], []
    for case in CASES:
        for m in ms:
            err = check(case, m)
            op_rows.append({"op": case.name, "M": m, "rel_err": err})
            if not err < BOUND:
                failures.append(f"{case.name} M={m}: relative error {err:.2e} > {BOUND}")
    print(f"ops checked on {card}: {len(failures)} failures", flush=True)
    if timing:
        for row in op_rows:
            case = next(c for c in CASES if c.name == row["op"])
            row["fused_us"], row["torch_us"] = time_op(TRITON, case, row["M"]), time_op(TORCH, case, row["M"])
        print("ops timed", flush=True)
    layer_results = layer_rows(ms, timing=timing)
    for row in layer_results:
        if not row["rel_err"] < LAYER_BOUND:
            failures.append(f"{row['layer']} layer M={row['M']}: fused vs torch regions {row['rel_err']:.2e}")
    print(f"correctness on {card}: {'FAILED' if failures else 'all within bounds'}", *failures, sep="\n  ")

    print(f"\nfused ops vs the same math in torch ops, {card}, CUDA graphs, us per call (bound {BOUND})")
    print(f"{'op':<24}{'M':>5}{'rel err':>10}{'fused us':>10}{'torch us':>10}{'speed-up':>10}")
    for r in op_rows:
        times = (
            f"{r['fused_us']:>10.2f}{r['torch_us']:>10.2f}{r['torch_us'] / r['fused_us']:>9.1f}x"
            if timing
            else ""
        )
        print(f"{r['op']:<24}{r['M']:>5}{r['rel_err']:>10.1e}{times}")
    print(
        f"\ndecoder layers of 26B-A4B shape, fused vs torch regions (kernels of the whole layer), bound {LAYER_BOUND}"
    )
    print(f"{'layer':<9}{'M':>5}{'rel err':>10}" + (f"{'kernels':>16}{'attn':>6}{'fused us':>10}{'torch us':>10}"
          f"{'speed-up':>10}" if timing else ""))  # fmt: skip
    for r in layer_results:
        line = f"{r['layer']:<9}{r['M']:>5}{r['rel_err']:>10.1e}"
        if timing:
            line += f"{r['fused_kernels']:>8} vs {r['torch_kernels']:<4}{r['attention_kernels']:>6}"
            line += f"{r['fused_us']:>10.1f}{r['torch_us']:>10.1f}{r['torch_us'] / r['fused_us']:>9.2f}x"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"card": card, "ops": op_rows, "layers": layer_results, "failures": failures}, f, indent=1
            )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
