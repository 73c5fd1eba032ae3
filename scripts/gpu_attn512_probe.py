"""Where the global layers' (head dim 512, K derived from the stored V) prefill attention loses its time.

One prompt chunk of 2,048 queries at the end of a long context (FP8 pool, 26B-A4B shapes), timed for:
  base    the kernel as the engine runs it,
  norot   the same without the rotated key columns' share of the scores (wrong numbers: the cost of the derivation),
  prerot  the rotated key columns computed once beforehand (kernels/rotated_keys.py), that launch included,
each at several tiles; the error of the right variants against the decode-shaped kernel on the same chunk.
Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_attn512_probe.py [--contexts 8192 32768] [--json OUT]
  ncu --clock-control none -k regex:_prefill_attention --launch-count 2 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 scripts/gpu_attn512_probe.py --ncu
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

from nvfp4kit.bench.attention import LayerPool
from nvfp4kit.config import load_preset
from nvfp4kit.kernels import prefill_attention as pa
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.rotated_keys import rotate_derived_keys
from nvfp4kit.tuning.timing import time_eager


def patched_module(name: str, old: str, new: str):
    """A copy of prefill_attention.py with one source change, importable (Triton reads the source file)."""
    source = inspect.getsource(pa)
    assert old in source, old
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def launch(module, pool: LayerPool, start: int, n: int, config, prerotate: bool = False):
    ints = torch.tensor([[start], [n], [0], [0]], dtype=torch.int32, device="cuda")
    batch = AttentionBatch(ints[0], ints[1], ints[2], pool.table, ints[3])
    q0 = torch.arange(0, n, config.block_q, dtype=torch.int32, device="cuda")
    items = WorkItems(torch.zeros_like(q0), q0, config.block_q)
    gen = torch.Generator(device="cuda").manual_seed(start)
    q = torch.randn(n, pool.q_heads, pool.head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    kwargs = dict(v_store=pool.v_store, k_store=None, batch=batch, items=items, window=None,
                  derived_key=pool.derived, out=out, block_size=pool.block_size, config=config)  # fmt: skip

    def call():
        if prerotate:
            first = torch.zeros(1, dtype=torch.int32, device="cuda")
            kwargs["rotated_keys"] = rotate_derived_keys(
                q, pool.v_store, pool.derived, batch, block_size=pool.block_size, first_row=first,
                total_rows=start + n, max_keys=start + n,
            )  # fmt: skip
        return module.prefill_attention(q, **kwargs)

    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--ncu", action="store_true", help="one launch at 32K for a profiler")
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    layer = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
    pool = LayerPool(
        cfg, layer, max(args.contexts), args.chunk, torch.float8_e4m3fn, device=torch.device("cuda")
    )
    norot_cut = patched_module(
        "pa_norot_cut",
        "                scores += rotated_key_scores(\n",
        "                if False:\n                    scores += rotated_key_scores(\n",
    )
    P = pa.PrefillConfig
    default = pa.prefill_configs(512, pool.q_heads // pool.kv_heads, (9, 0))[0]
    if args.ncu:
        start = 32768 - args.chunk
        launch(pa, pool, start, args.chunk, default)()
        launch(pa, pool, start, args.chunk, default, prerotate=True)()
        torch.cuda.synchronize()
        return
    variants = [("base", pa, c) for c in (default, P(8, 32, 1, 8, 2), P(8, 64, 1, 8, 3))]
    variants += [("norot", norot_cut, c) for c in (default, P(8, 64, 1, 8, 3), P(8, 128, 1, 8, 2))]
    variants += [
        ("prerot", pa, c) for c in (default, P(8, 64, 1, 8, 3), P(8, 128, 1, 8, 2), P(8, 32, 1, 8, 2))
    ]
    rows = []
    for context in args.contexts:
        start = context - args.chunk
        flops = pool.flops(start, args.chunk)
        ref = pool.call("paged", start, args.chunk)().float()
        for name, module, config in variants:
            try:
                call = launch(module, pool, start, args.chunk, config, prerotate=name == "prerot")
                got = call().float()
                err = float((got - ref).norm() / ref.norm())
                us = time_eager(lambda _, call=call: call(), sets=1, calls=3, repeats=5)
            except Exception as exc:  # a tile that does not fit: say so, go on
                print(f"{name} {config}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                continue
            row = dict(context=context, variant=name, config=str(config), ms=round(us / 1e3, 3),
                       tflops=round(flops / us / 1e6, 1), rel_err=err)  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    print(
        f"\n{torch.cuda.get_device_name()}: global layer (d512, FP8, K derived), last {args.chunk}-query chunk"
    )
    print(f"{'context':>7} {'variant':7} {'keys':>4} {'stages':>6} {'ms':>8} {'TFLOP/s':>8} {'err':>8}")
    for r in rows:
        c = eval("pa." + r["config"])  # noqa: S307 (our own repr)
        print(
            f"{r['context']:>7} {r['variant']:7} {c.block_n:>4} {c.num_stages:>6} {r['ms']:>8.3f} {r['tflops']:>8.1f}"
            f" {r['rel_err']:>8.1e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
