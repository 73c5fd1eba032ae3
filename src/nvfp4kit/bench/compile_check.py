"""`nvfp4kit bench compile`: what our kernels ask of cards we do not have, read off their compiled code.

For each card (plan/gpus.py) the kernels a model's steps launch are compiled for its compute capability, with
the launch configurations that card gets without a tuning table (the heuristics, sized by its SM count), at
decode and prefill token counts: the W4A16 linears (GEMV and tensor-core kernels, the prefill dequantizer), the
fused MoE in every mode, and prefill and decode attention of both layer kinds over FP8 and BF16 KV pools; then a
few engine steps of a model with the same structure at tiny widths, which reach every other kernel (norms, RoPE,
routing, the FP8 lm_head). Each row gives the kernel's shared memory, registers, spills and resident blocks per SM; a kernel that needs more
shared memory than a block may have there would fail at its first launch (0 blocks: the command exits 1).
Runs on the CPU (Triton and its bundled ptxas compile for any target); nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from nvfp4kit.config import Gemma4TextConfig, load_config, load_preset
from nvfp4kit.plan.gpus import GPUS, GpuSpec, find_gpu

DEFAULT_TOKENS = (1, 16, 64, 512, 2048)
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def linear_cases(cfg: Gemma4TextConfig, tokens) -> Iterator[tuple[str, int, Callable[[], object]]]:
    """(case, M, launch) for every linear shape at each token count (heuristic config), and its dequantizer."""
    from nvfp4kit.kernels.dequant import dequantize_nvfp4
    from nvfp4kit.kernels.w4a16_linear import w4a16_linear
    from nvfp4kit.tuning.autotune import model_shapes
    from nvfp4kit.tuning.cases import random_nvfp4

    for n, k in model_shapes(cfg).linear:
        weight = random_nvfp4(n, k, device="cpu")
        for m in tokens:
            x = torch.zeros(m, k, dtype=torch.bfloat16)
            yield f"linear {n}x{k}", m, lambda x=x, w=weight: w4a16_linear(x, w, config=_linear_config(x, w))
        yield f"dequant {n}x{k}", 0, lambda w=weight: dequantize_nvfp4(w)


def _linear_config(x: torch.Tensor, weight):
    from nvfp4kit.kernels.configs import heuristic_linear

    n, k = weight.packed.shape[0], weight.packed.shape[1] * 2
    return heuristic_linear(x.shape[0], n, k, device=x.device)


def moe_cases(cfg: Gemma4TextConfig, tokens) -> Iterator[tuple[str, int, Callable[[], object]]]:
    """(case, M, launch) of the fused MoE at each token count; its tensors are the launch's arguments."""
    from nvfp4kit.kernels.configs import heuristic_moe
    from nvfp4kit.kernels.fused_moe import fused_moe
    from nvfp4kit.tuning.autotune import model_shapes
    from nvfp4kit.tuning.cases import random_nvfp4, random_routing

    shape = model_shapes(cfg).moe
    if shape is None:
        return
    e, top_k, h, i = (shape[key] for key in ("experts", "top_k", "hidden", "inter"))
    gate_up = random_nvfp4(2 * i, h, experts=e, device="cpu")
    down = random_nvfp4(h, i, experts=e, device="cpu")
    for m in tokens:
        x = torch.zeros(m, h, dtype=torch.bfloat16)
        ids, weights = random_routing(m, e, top_k, device="cpu")

        def launch(x=x, ids=ids, weights=weights, m=m, gate_up=gate_up, down=down):
            config = heuristic_moe(m, e, top_k, h, i, device=x.device)
            return fused_moe(x, ids, weights, gate_up, down, config=config)

        yield f"moe {e}x{top_k}x{h}x{i}", m, launch


def attention_cases(cfg: Gemma4TextConfig, kv_dtypes) -> Iterator[tuple[str, int, Callable[[], object]]]:
    """(case, tokens, launch) of prefill and decode attention for each layer kind and KV dtype."""
    from nvfp4kit.bench.attention import LayerPool

    class Pool(LayerPool):
        dtype = torch.bfloat16  # the engine's activations on a GPU

    kinds = {}
    for layer in range(cfg.num_hidden_layers):
        kinds.setdefault(cfg.is_sliding(layer), layer)
    for sliding, layer in sorted(kinds.items()):
        kind = "sliding" if sliding else "global"
        for name in kv_dtypes:
            pool = Pool(cfg, layer, 4096, 512, KV_DTYPES[name], device=torch.device("cpu"))
            yield f"prefill attention {kind} d{pool.head_dim} {name}", 512, _prefill_call(pool, 2048, 512)
            yield f"decode attention {kind} d{pool.head_dim} {name}", 1, _decode_call(pool)


def _prefill_call(pool, start: int, n: int) -> Callable[[], object]:
    """A chunk of n prompt tokens at `start`, the kernel choosing its tiles as in the engine (no config given)."""
    from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
    from nvfp4kit.kernels.prefill_attention import prefill_attention, prefill_block_q

    block_q = prefill_block_q(pool.head_dim, pool.q_heads // pool.kv_heads)
    ints = torch.tensor([[start], [n], [0], [0]], dtype=torch.int32)
    batch = AttentionBatch(ints[0], ints[1], ints[2], pool.table, ints[3])
    q0 = torch.arange(0, n, block_q, dtype=torch.int32)
    items = WorkItems(torch.zeros_like(q0), q0, block_q)
    q = torch.zeros(n, pool.q_heads, pool.head_dim, dtype=torch.bfloat16)
    where = {"ring_size": pool.ring_size} if pool.sliding else {"block_size": pool.block_size}
    return lambda: prefill_attention(
        q, v_store=pool.v_store, k_store=pool.k_store, batch=batch, items=items, window=pool.window,
        derived_key=pool.derived, **where,
    )  # fmt: skip


def _decode_call(pool) -> Callable[[], object]:
    """One decode token at the end of the pool's sequence, keys split as the engine splits them."""
    from nvfp4kit.kernels.attention_launch import choose_num_splits
    from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
    from nvfp4kit.kernels.paged_attention import paged_attention

    length = pool.table.shape[1] * pool.block_size if not pool.sliding else pool.ring_size
    ints = torch.tensor([[length - 1], [1], [0], [0]], dtype=torch.int32)
    batch = AttentionBatch(ints[0], ints[1], ints[2], pool.table, ints[3])
    items = WorkItems(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 1)
    q = torch.zeros(1, pool.q_heads, pool.head_dim, dtype=torch.bfloat16)
    where = {"ring_size": pool.ring_size} if pool.sliding else {"block_size": pool.block_size}

    def launch():
        splits = choose_num_splits(
            1, pool.kv_heads, length, device=q.device, head_dim=pool.head_dim,
            group=pool.q_heads // pool.kv_heads, fp8=pool.v_store.element_size() == 1,
        )  # fmt: skip
        return paged_attention(
            q, v_store=pool.v_store, k_store=pool.k_store, batch=batch, items=items, window=pool.window,
            derived_key=pool.derived, num_splits=splits, **where,
        )  # fmt: skip

    return launch


def engine_cases(kv_dtypes) -> Iterator[tuple[str, int, Callable[[], object]]]:
    """A few engine steps (prefill, decode, FP8 lm_head) of a model with the 26B-A4B's structure at tiny widths:
    every kernel the engine launches, chosen as the engine chooses, including the small fused ones."""

    def steps(kv: str):
        from nvfp4kit.config import config_from_dict
        from nvfp4kit.engine.engine import Engine, EngineConfig
        from nvfp4kit.kernels.backend import TritonBackend
        from nvfp4kit.sampling import SamplingParams
        from nvfp4kit.testing.random_model import random_model
        from nvfp4kit.testing.tiny_config import tiny_text_config

        text = tiny_text_config("moe", num_experts=16, top_k_experts=4, sliding_window=64)
        model = random_model(config_from_dict(text), device="cpu", backend=TritonBackend())
        model.use_fp8_lm_head()
        config = EngineConfig(
            kv_dtype="fp8_e4m3" if kv == "fp8" else "bf16", max_num_seqs=4, max_num_batched_tokens=128,
            max_model_len=256, attention_backend="triton", prefix_caching=False, overlap_schedule=False,
        )  # fmt: skip
        engine = Engine(model, None, config=config)
        for i in range(2):
            engine.add_request(
                [5 + (i * 7 + j) % 300 for j in range(40 + 30 * i)], SamplingParams(max_tokens=3)
            )
        while engine.has_unfinished():
            engine.step()

    for kv in kv_dtypes:
        yield f"engine steps (tiny widths) {kv}", 0, lambda kv=kv: steps(kv)


def check_card(
    gpu: GpuSpec,
    cfg: Gemma4TextConfig,
    *,
    tokens=DEFAULT_TOKENS,
    kv_dtypes=("fp8", "bf16"),
    engine_steps=True,
    progress: bool = False,
) -> list:
    """Rows for every kernel launch of the cases on `gpu`: what it asks and how many blocks fit an SM."""
    from nvfp4kit.kernels.arch_limits import arch_limits
    from nvfp4kit.kernels.prefill_attention import forget_oversized_tiles
    from nvfp4kit.tuning.cross_compile import compile_for

    limits = arch_limits(gpu.compute_capability)
    forget_oversized_tiles()
    cases = [*linear_cases(cfg, tokens), *moe_cases(cfg, tokens), *attention_cases(cfg, kv_dtypes)]
    cases += list(engine_cases(kv_dtypes)) if engine_steps else []
    rows = []
    bar = tqdm(cases, desc=f"compiling for {gpu.name} ({gpu.sm})", unit="case", disable=not progress)
    for case, m, launch in bar:
        bar.set_postfix_str(f"{case} M={m}" if m else case)
        with compile_for(gpu.compute_capability, gpu.sms, zero_allocations=True) as launched:
            try:
                launch()
                error = None
            except Exception as exc:  # a kernel that does not compile for this card is a finding, not a crash
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        for n, kernel in enumerate(launched):
            row = {"gpu": gpu.name, "case": case, "m": m, **asdict(kernel)}
            row["constants"] = {
                k: v if isinstance(v, int | float | bool | str) else str(v) for k, v in kernel.constants
            }
            row["blocks_per_sm"] = kernel.blocks_per_sm(limits)
            row["occupancy"] = round(kernel.occupancy(limits), 3)
            row["smem_limit"] = limits.smem_per_block
            # too big, and another launch followed: the caller fell back to smaller tiles, as on the card
            row["fell_back"] = (
                kernel.shared > limits.smem_per_block and n + 1 < len(launched) and error is None
            )
            rows.append(row)
        if error is not None:
            rows.append(
                {"gpu": gpu.name, "case": case, "m": m, "kernel": None, "error": error, "blocks_per_sm": 0}
            )
    return rows


def _flag(r: dict) -> str:
    if r.get("error"):
        return f"**does not compile**: {r['error']}"
    if r["fell_back"]:
        return "too big: falls back"
    return "**cannot launch**" if not r["blocks_per_sm"] else ""


def _print_launches(rows: list, out=sys.stdout) -> None:
    """Every launch: one row each."""
    print("| card | case | M | kernel | smem KB | regs | spill B | warps | stages | blocks/SM | occupancy | note |",
          file=out)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        if r.get("error"):
            print(f"| {r['gpu']} | {r['case']} | {r['m']} | | | | | | | 0 | | {_flag(r)} |", file=out)
            continue
        print(
            f"| {r['gpu']} | {r['case']} | {r['m'] or '-'} | {r['kernel']} | {r['shared'] / 1024:.1f} | "
            f"{r['registers'] if r['registers'] is not None else '?'} | {r['spills'] or 0} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['blocks_per_sm']} | {100 * r['occupancy']:.0f}% | {_flag(r)} |",
            file=out,
        )


def _print_summary(rows: list, out=sys.stdout) -> None:
    """One row per card and kernel: how many launches, the most shared memory and spill, the fewest blocks."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["gpu"], r.get("kernel") or "(error)"), []).append(r)
    print(
        "| card | kernel | launches | max smem KB | max spill B | min blocks/SM | failed launches |", file=out
    )
    print("|---|---|---|---|---|---|---|", file=out)
    for (gpu, kernel), rs in groups.items():
        ran = [r for r in rs if not r.get("error") and not r["fell_back"]]
        failed = len(rs) - len(ran)
        if not ran:
            print(f"| {gpu} | {kernel} | {len(rs)} | | | 0 | {failed} |", file=out)
            continue
        print(
            f"| {gpu} | {kernel} | {len(rs)} | {max(r['shared'] for r in ran) / 1024:.1f} | "
            f"{max(r['spills'] or 0 for r in ran)} | {min(r['blocks_per_sm'] for r in ran)} | {failed} |",
            file=out,
        )


def run_compile_check(args: argparse.Namespace) -> int:
    try:
        import triton  # noqa: F401  (compiling needs it, and its ptxas; not in the README's CPU install)
    except ImportError as err:
        raise RuntimeError("bench compile needs Triton: pip install triton (no GPU needed)") from err
    cfg = load_config(args.preset) if Path(args.preset).is_dir() else load_preset(args.preset)
    gpus = [find_gpu(name) for name in args.gpu] if args.gpu else [g for g in GPUS if not g.native_fp4]
    rows = []
    for gpu in gpus:
        rows += check_card(gpu, cfg, tokens=args.tokens, kv_dtypes=args.kv_dtype, progress=True)
    (_print_launches if args.verbose else _print_summary)(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1) + "\n")
    failing = [r for r in rows if r["blocks_per_sm"] == 0 and not r.get("fell_back")]
    for r in failing:
        print(
            f"FAILS on {r['gpu']}: {r['case']} M={r['m']} {r.get('kernel') or r.get('error')}",
            file=sys.stderr,
        )
    return 1 if failing else 0


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser(
        "compile",
        help="compile the kernels for other cards (CPU is enough): shared memory, registers, blocks per SM",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--preset", default="gemma-4-26b-a4b", help="model shape: a preset or a config folder")
    p.add_argument(
        "--gpu", nargs="+", help="cards by name or alias (default: every card without native FP4 in `plan`)"
    )
    p.add_argument(
        "--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="token counts per step"
    )
    p.add_argument(
        "--kv-dtype", nargs="+", default=["fp8", "bf16"], choices=sorted(KV_DTYPES), help="KV pools"
    )
    p.add_argument("--verbose", action="store_true", help="one table row per launch instead of per kernel")
    p.add_argument("--json", help="write the rows here (every launch)")
    p.set_defaults(func=run_compile_check)
