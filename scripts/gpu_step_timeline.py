"""Where a decode step's GPU time goes between kernels: one graph-replayed step on the profiler's timeline.

`bench engine --profile` sums kernel durations, which overlap across the two streams and say nothing of the time
between kernels (session 28, H100: 0.2 us at the median inside a batch-96 graph). For one decode step of
each batch size it reports the span (first kernel start to last kernel end), the busy time (the union of kernel
intervals over all streams), the idle time between kernels and which kernels the longest idle stretches come
before, and how much the second stream's kernels overlap the first's. Random all-NVFP4 weights of the 26B-A4B
shape, FP8 KV, CUDA graphs of the timed batch sizes. Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_step_timeline.py [--batches 1 16 96] [--context 816] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.testing.random_model import random_model


def step_kernels(engine: Engine, batch: int, context: int) -> list[tuple[str, int, int, int]]:
    """(name, start ns, end ns, stream) of the GPU kernels and copies of one decode step of `batch` sequences."""
    reqs = runs.start_batch(engine, batch=batch, context=context, seed=7)
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    runs.end_batch(engine, reqs)
    out = []
    for ev in prof.profiler.kineto_results.events():
        if ev.device_type().name == "CUDA" and ev.duration_ns() > 0:
            out.append((ev.name(), ev.start_ns(), ev.start_ns() + ev.duration_ns(), ev.device_resource_id()))
    return sorted(out, key=lambda k: k[1])


def decode_engine(model, graph_sizes: list[int], context: int, chunk: int = 2048) -> Engine:
    """An engine for decode timing: FP8 KV, CUDA graphs of `graph_sizes` only, room for the largest at `context`."""
    top = max(graph_sizes)
    config = EngineConfig(
        kv_dtype="fp8_e4m3", max_num_seqs=top, max_num_batched_tokens=chunk,
        num_kv_tokens=top * (context + 64 + -(-top * context // chunk)) + 4096,  # decodes during prefill too
        prefix_caching=False, warmup=True,
        prefill_graphs=(), graph_batch_sizes=tuple(sorted(graph_sizes)),
    )  # fmt: skip
    return Engine(model, None, config=config)


def analyse(kernels: list[tuple[str, int, int, int]]) -> dict:
    """Span, busy (union over streams), summed durations and the idle stretches by the kernel they precede."""
    span = kernels[-1][2] - kernels[0][1] if kernels else 0
    total = sum(end - start for _, start, end, _ in kernels)
    busy, idle_before, idle_pairs, gaps = 0, collections.Counter(), collections.Counter(), []
    cur_start, cur_end, last_name = None, None, ""
    for name, start, end, _ in kernels:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
                gap = start - cur_end
                gaps.append(gap)
                idle_before[name[:60]] += gap
                idle_pairs[(last_name[:40], name[:40])] += gap
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
        if end >= cur_end:
            last_name = name
    if cur_end is not None:
        busy += cur_end - cur_start
    streams = collections.Counter(stream for *_, stream in kernels)
    gaps.sort()
    pct = (lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] / 1e3) if gaps else (lambda q: 0.0)
    return {
        "kernels": len(kernels),
        "streams": dict(streams),
        "span_ms": span / 1e6,
        "busy_ms": busy / 1e6,
        "sum_ms": total / 1e6,
        "idle_ms": (span - busy) / 1e6,
        "gaps": len(gaps),
        "gap_us_p50": pct(0.5),
        "gap_us_p90": pct(0.9),
        "gap_us_max": gaps[-1] / 1e3 if gaps else 0.0,
        "idle_before": [(n, v / 1e3) for n, v in idle_before.most_common(12)],
        "idle_pairs": [(f"{a} -> {b}", v / 1e3) for (a, b), v in idle_pairs.most_common(12)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 96])
    p.add_argument("--context", type=int, default=816)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument(
        "--padded",
        type=int,
        nargs="*",
        default=[100],
        help="also time these batches in each captured graph that holds them (the padding's cost)",
    )
    p.add_argument("--extra-graphs", type=int, nargs="*", default=[104, 112])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    model = random_model(cfg, quantized=True, device="cuda")
    sizes = sorted({*args.batches, *args.padded, *args.extra_graphs})
    engine = decode_engine(model, sizes, args.context)
    rows = []
    for batch in args.batches:
        timed = runs.decode_speed(engine, batch=batch, context=args.context, steps=args.steps)
        row = {"batch": batch, "context": args.context, "event_gpu_ms": timed.gpu_ms_per_step}
        row.update(analyse(step_kernels(engine, batch, args.context)))
        rows.append(row)
        print(f"\nbatch {batch}: CUDA events {timed.gpu_ms_per_step:.3f} ms a step; timeline span {row['span_ms']:.3f}"
              f" ms, busy {row['busy_ms']:.3f}, kernels' sum {row['sum_ms']:.3f}, idle {row['idle_ms']:.3f} ms in"
              f" {row['gaps']} gaps (p50 {row['gap_us_p50']:.1f} us, p90 {row['gap_us_p90']:.1f}, max"
              f" {row['gap_us_max']:.1f}); {row['kernels']} kernels on streams {row['streams']}")  # fmt: skip
        print("  idle before:")
        for name, us in row["idle_before"]:
            print(f"    {us:9.1f} us  {name}")
        print("  idle between:")
        for pair, us in row["idle_pairs"]:
            print(f"    {us:9.1f} us  {pair}")
    padded = []
    for batch in args.padded:  # the same rows in every graph that holds them: what padding rows cost
        for size in [s for s in sizes if s >= batch]:
            engine.graphs.batch_sizes = (size,)
            timed = runs.decode_speed(engine, batch=batch, context=args.context, steps=args.steps)
            padded.append({"batch": batch, "graph": size, "gpu_ms": timed.gpu_ms_per_step})
            print(f"batch {batch} in the {size}-row graph: {timed.gpu_ms_per_step:.3f} ms a step (GPU)")
        engine.graphs.batch_sizes = tuple(sizes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "padded": padded}, f, indent=1)
    print("\n| batch | events ms | span ms | busy ms | kernels' sum ms | idle ms | gaps | p50 gap us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['event_gpu_ms']:.3f} | {r['span_ms']:.3f} | {r['busy_ms']:.3f} | {r['sum_ms']:.3f}"
              f" | {r['idle_ms']:.3f} | {r['gaps']} | {r['gap_us_p50']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
