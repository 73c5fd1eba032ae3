"""`nvfp4kit bench kernels`: W4A16 kernels at every 26B-A4B linear shape and the MoE layer, against cuBLAS.

For each op and M: microseconds per call (CUDA graph of many calls; back-to-back eager launches too),
GB/s of the bytes the op must move, % of the device-to-device copy bandwidth measured in the same run,
TFLOP/s, and the same shape in BF16 through torch (cuBLAS) in the same run. `--tune` first times a list of
candidate configurations per shape and M, keeps the fastest that passes the correctness bound, and can
write them as the card's tuned table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from nvfp4kit.bench.report import format_table, row_for
from nvfp4kit.kernels.configs import (
    config_to_dict,
    heuristic_linear,
    heuristic_moe,
    select_linear_config,
    sm_count,
)
from nvfp4kit.kernels.path_limits import FRAG_TOKENS
from nvfp4kit.kernels.thresholds import DEQUANT_MIN_M
from nvfp4kit.tuning.cases import DENSE_SHAPES, LM_HEAD_SHAPE, MOE_SHAPE, DenseCase, MoECase
from nvfp4kit.tuning.search import Budget, linear_candidates, moe_candidates, tune_case
from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes, rotation_sets, time_call, time_graph

DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 4096)
# `--prefill`: prompt-chunk sizes; there the default path is dequantize-then-cuBLAS (the dense linears) and
# grouped GEMMs (the MoE), and a row's heuristic_us is the Triton tensor-core kernel at its heuristic config
PREFILL_MS = (512, 2048, 4096, 8192)
OPS = (*DENSE_SHAPES, "moe", "lm_head_bf16")


def _linear_path(m: int, n: int, k: int) -> str:
    """What `w4a16_linear` runs by default for bf16 tokens: "dequant" (expand, then cuBLAS) or the kernel of its
    config ("frag", "dot", "gemv")."""
    return (
        "dequant" if m >= DEQUANT_MIN_M else select_linear_config(m, n, k, device=torch.device("cuda")).kernel
    )


def _moe_path(case: MoECase, top_k: int, config=None) -> str:
    from nvfp4kit.kernels.moe_dispatch import moe_path

    return moe_path(case.xs[0], top_k, case.gate_up[0], case.down[0], config=config)


def _bench_dense(op, ms, args, ctx, rows, tuned, log) -> None:
    n, k = DENSE_SHAPES[op]
    for m in ms:
        per_set = n * k * 9 // 16 + 2 * m * k
        sets = rotation_sets(per_set, l2_bytes=ctx["l2"])
        bf16_sets = rotation_sets(2 * n * k, l2_bytes=ctx["l2"])
        case = DenseCase.build(op, n, k, m, sets=sets, bf16_sets=bf16_sets)
        calls = 20 if m <= 512 else 6
        cfg, tuned_us = None, None
        if args.tune:
            cands = linear_candidates(m, n, k, sms=ctx["sms"], decodes=tuple(args.decodes), frag=ctx["frag"])
            cfg, tuned_us, tried = tune_case(
                case, cands, sets=sets, calls=calls, budget=ctx["budget"], log=log
            )
            if cfg is not None:
                tuned.setdefault("linear", {}).setdefault(f"{n}x{k}", {})[str(m)] = config_to_dict(cfg)
            log(f"  {op} M={m}: best of {tried} {cfg} {tuned_us:.1f} us")
        timing = time_call(case.call(cfg), sets=sets, calls=calls)
        base = time_call(case.bf16_call(), sets=bf16_sets, calls=calls)
        rows.append(row_for(op, f"{n}x{k}", m, timing, base, case, ctx["copy_gbps"], case.error(cfg), cfg))
        rows[-1]["path"] = "tuned" if cfg is not None else _linear_path(m, n, k)
        heuristic = heuristic_linear(m, n, k, device=torch.device("cuda"))
        rows[-1]["heuristic_us"] = round(time_graph(case.call(heuristic), sets=sets, calls=calls), 2)
        log(f"  {format_table(rows[-1:], header=False)}")
        del case
        torch.cuda.empty_cache()


def _bench_moe(ms, args, ctx, rows, tuned, log) -> None:
    e, top_k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
    key = f"{e}x{top_k}x{h}x{i}"
    for m in ms:
        case = MoECase.build(m, weight_sets=2, route_sets=8 if m <= 512 else 2)
        calls = 16 if m <= 128 else (8 if m <= 512 else 4)
        cfg, tuned_us = None, None
        if args.tune:
            cands = moe_candidates(m, e, top_k, decodes=tuple(args.decodes), frag=ctx["frag"])
            cfg, tuned_us, tried = tune_case(case, cands, sets=16, calls=calls, budget=ctx["budget"], log=log)
            if cfg is not None:
                tuned.setdefault("moe", {}).setdefault(key, {})[str(m)] = config_to_dict(cfg)
            log(f"  moe M={m}: best of {tried} {cfg} {tuned_us:.1f} us")
        timing = time_call(case.call(cfg), sets=16, calls=calls)
        base = time_call(case.bf16_call(), sets=16, calls=calls)
        shape = f"E{e} top{top_k} H{h} I{i}"
        rows.append(row_for("moe", shape, m, timing, base, case, ctx["copy_gbps"], case.error(cfg), cfg))
        rows[-1]["path"] = _moe_path(case, top_k, cfg) + (" (tuned)" if cfg is not None else "")
        heuristic = heuristic_moe(m, e, top_k, h, i, device=torch.device("cuda"))
        rows[-1]["heuristic_us"] = round(time_graph(case.call(heuristic), sets=16, calls=calls), 2)
        log(f"  {format_table(rows[-1:], header=False)}")
        del case
        torch.cuda.empty_cache()


def _bench_lm_head(ms, ctx, rows, log) -> None:
    n, k = LM_HEAD_SHAPE
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        calls = 10 if m <= 512 else 3
        timing = time_call(lambda _i, x=x: torch.nn.functional.linear(x, weight), sets=1, calls=calls)
        nbytes = 2 * (n * k + m * (n + k))
        us = timing.graph_us
        rows.append(
            {
                "op": "lm_head_bf16",
                "shape": f"{n}x{k}",
                "M": m,
                "us": round(us, 2),
                "us_eager": round(timing.eager_us, 2),
                "gbps": round(nbytes / us / 1e3, 1),
                "pct_copy_bw": round(100 * nbytes / us / 1e3 / ctx["copy_gbps"], 1),
                "tflops": round(2 * m * n * k / us / 1e6, 2),
                "bf16_us": round(us, 2),
            }
        )
        log(f"  {format_table(rows[-1:], header=False)}")


def run_kernels_benchmark(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("bench kernels needs a CUDA GPU (the Triton kernels are timed on the device)")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.prefill:
        args.m = list(PREFILL_MS)
    ops = args.ops or [op for op in OPS if not (args.prefill and op == "lm_head_bf16")]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {list(OPS)}")
    ctx = {
        "copy_gbps": copy_bandwidth_gbps(),
        "l2": l2_cache_bytes(),
        "sms": sm_count(torch.device("cuda")),
        # the fragment kernels are --tune candidates where they run (SM80+, unless NVFP4KIT_FRAG_GEMV=0)
        "frag": FRAG_TOKENS > 0 and torch.cuda.get_device_capability() >= (8, 0),
        "budget": Budget(args.tune_budget_s),
    }
    log(
        f"{torch.cuda.get_device_name()}: copy {ctx['copy_gbps']:.0f} GB/s, L2 {ctx['l2'] >> 20} MiB, {ctx['sms']} SMs"
    )
    rows: list[dict] = []
    tuned: dict = {}
    result = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": _command_line(),
        "copy_gbps": round(ctx["copy_gbps"], 1),
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
        "rows": rows,
    }
    for op in ops:
        log(f"{op}:")
        if op in DENSE_SHAPES:
            _bench_dense(op, args.m, args, ctx, rows, tuned, log)
        elif op == "moe":
            _bench_moe(args.m, args, ctx, rows, tuned, log)
        else:
            _bench_lm_head(args.m, ctx, rows, log)
        _write(args, result, tuned)  # after each op, so a cut-off run keeps what it measured
    print(format_table(rows))
    return 0


def _write(args: argparse.Namespace, result: dict, tuned: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.tuned_out and tuned:
        Path(args.tuned_out).write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")


def _command_line() -> str:
    argv = sys.argv[1:]
    tail = argv[argv.index("kernels") + 1 :] if "kernels" in argv else argv
    return " ".join(["nvfp4kit", "bench", "kernels", *tail])


def _triton_version() -> str:
    import triton

    return triton.__version__


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser("kernels", help="W4A16 linear and fused-MoE kernels vs BF16 cuBLAS (CUDA only)")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"subset of {', '.join(OPS)}")
    p.add_argument(
        "--m", nargs="+", type=int, default=list(DEFAULT_MS), help="token counts (default: %(default)s)"
    )
    p.add_argument(
        "--prefill",
        action="store_true",
        help=f"prefill rows: M = {' '.join(map(str, PREFILL_MS))}, no lm_head",
    )
    p.add_argument("--tune", action="store_true", help="time candidate configs first and use the fastest")
    p.add_argument("--decodes", nargs="+", default=["asm"], choices=["bits", "asm"], help="decoders to tune")
    p.add_argument("--tune-budget-s", type=float, default=None, help="stop tuning after this many seconds")
    p.add_argument(
        "--tuned-out", help=f"write the tuned table here (for {Path('kernels/tuned')}/<card>.json)"
    )
    p.add_argument("--json", help="write the result rows as JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.set_defaults(func=run_kernels_benchmark)
