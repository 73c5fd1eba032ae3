"""`nvfp4kit bench engine`: the serving engine end to end on a CUDA GPU, against the roofline and HF transformers.

Default: a random all-NVFP4 model of the Gemma 4 26B-A4B shape built on the GPU (no download), FP8 KV, CUDA
graphs. Measures decode tokens/s at several batch sizes (with achieved GB/s per step and % of the card's
bandwidth roofline from the planner), prefill tokens/s and time to first token at several prompt lengths, peak
memory; then the baseline in the same run: HF transformers' Gemma4ForCausalLM in BF16 at the same shape.
Writes JSON rows `{scenario, batch, prompt_len, tokens_per_s, pct_roofline, baseline, baseline_tokens_per_s}`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import PRESET_DIR, load_config, load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.linear_copies import keep_linear_copies, linear_copies_to_keep
from nvfp4kit.plan.checkpoint import linear_copy_bytes_from_checkpoint, weights_from_checkpoint
from nvfp4kit.plan.units import token_counts
from nvfp4kit.plan.weights import linear_copy_bytes, weights_from_config


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(args: argparse.Namespace):
    """(model, config, weight breakdown for the roofline, label) from --model or the random --preset."""
    if getattr(args, "tensor_parallel_size", 1) > 1:
        return parallel_model(args)
    if args.model:
        from nvfp4kit.model.loader import load_model

        model = load_model(args.model, dtype=torch.bfloat16, device="cuda")
        return model, load_config(args.model), weights_from_checkpoint(args.model), Path(args.model).name
    from nvfp4kit.testing.random_model import random_model

    cfg = load_preset(args.preset)
    quantized = args.weights == "nvfp4"
    model = random_model(cfg, quantized=quantized, device="cuda")
    recipe = "all-nvfp4" if quantized else "bf16"
    return model, cfg, weights_from_config(cfg, recipe=recipe), f"{args.preset} (random {args.weights})"


def parallel_model(args: argparse.Namespace):
    """`build_model` over --tensor-parallel-size GPUs: rank 0's model; the group is kept in args.parallel_group
    (closed by `measure_engine`). Random weights: every rank builds the whole random model and keeps its cut."""
    from nvfp4kit.distributed.group import TensorParallelGroup

    n, device = args.tensor_parallel_size, torch.device("cuda")
    if args.model:
        group = TensorParallelGroup.start(
            args.model, n, dtype=torch.bfloat16, device=device, moe=args.moe_parallel
        )
        cfg, weights = load_config(args.model), weights_from_checkpoint(args.model)
        label = Path(args.model).name
    else:
        from nvfp4kit.testing.random_llm import random_shard, write_random_folder

        quantized = args.weights == "nvfp4"
        folder = Path(tempfile.mkdtemp(prefix="nvfp4kit-bench-tp-"))
        cfg = write_random_folder(args.preset, folder)
        loader = functools.partial(random_shard, quantized=quantized)
        group = TensorParallelGroup.start(
            folder, n, dtype=torch.bfloat16, device=device, loader=loader, quantized=quantized,
            moe=args.moe_parallel,
        )  # fmt: skip
        weights = weights_from_config(cfg, recipe="all-nvfp4" if quantized else "bf16")
        label = f"{args.preset} (random {args.weights})"
    args.parallel_group = group
    return group.model, cfg, weights, f"{label}, tensor parallel {n} (MoE split by {args.moe_parallel})"


def engine_config(args: argparse.Namespace, cfg) -> EngineConfig:
    longest = max([*args.prefill, args.context + args.steps + 8])
    most = max([*args.decode_batches, *(args.sampled_batches or [])])  # the sampled batches run in it too
    # the first prompts decode while the later ones prefill (runs.start_batch): a step each, at the smallest budget
    during_prefill = -(-most * args.context // (args.chunk or 512))
    tokens = max(most * (args.context + args.steps + 8 + during_prefill), longest) + 1024
    prefill_graphs = getattr(args, "prefill_graphs", None)
    if getattr(args, "tensor_parallel_size", 1) > 1:  # as the server: the ranks do not replay prefill graphs
        if prefill_graphs:
            raise SystemExit("error: --prefill-graphs is not supported with --tensor-parallel-size > 1")
        prefill_graphs = ()
    return EngineConfig(
        kv_dtype=args.kv_dtype,
        max_num_seqs=most,
        max_num_batched_tokens=args.chunk,
        max_model_len=args.max_model_len,
        num_kv_tokens=tokens,
        cuda_graphs=not args.eager,
        prefill_graphs=prefill_graphs,
        prefix_caching=False,  # the prefill rows reuse one seed: measure whole prefills, not cache hits
    )


def measure_engine(args: argparse.Namespace, rows: list[dict]) -> dict:
    torch.cuda.reset_peak_memory_stats()
    model, cfg, weights, label = build_model(args)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    _log(f"{label}: {weights_gib:.3f} GiB on the GPU (planner: {weights.text_bytes / 2**30:.3f} GiB)")
    copies = 0
    if args.model:
        copy_bytes = linear_copy_bytes_from_checkpoint(args.model)
    else:
        copy_bytes = linear_copy_bytes(cfg) if args.weights == "nvfp4" else 0
    tp = getattr(args, "tensor_parallel_size", 1)
    if linear_copies_to_keep(
        args.linear_copies, device="cuda", copy_bytes=copy_bytes, tensor_parallel_size=tp
    ):
        copies = keep_linear_copies(model)  # before the graphs, as serve does
        _log(f"BF16 copies of the attention and dense-MLP weights: {copies / 2**30:.3f} GiB")
    engine = Engine(model, None, config=engine_config(args, cfg))
    if getattr(args, "parallel_group", None) is not None:
        args.parallel_group.attach(engine)  # the other ranks' KV caches
        engine.capture_decode_graphs()  # every rank's
    spec = runs.card_spec()
    bandwidth = spec.bandwidth_bytes_per_s if spec else args.bandwidth_gbps * 1e9
    runs.decode_speed(engine, batch=1, context=64, steps=4)  # compile the eager kernels once
    # --overlap both: "decode" rows with the overlap scheduler, "decode_sync" rows without it
    modes = {"on": [("decode", True)], "off": [("decode", False)]}.get(
        args.overlap, [("decode", True), ("decode_sync", False)]
    )
    for (scenario, overlap), batch in ((m, b) for m in modes for b in args.decode_batches):
        result = runs.decode_speed(
            engine, batch=batch, context=args.context, steps=args.steps, overlap=overlap
        )
        step_bytes, roof = runs.decode_roofline(
            cfg,
            weights,
            batch=batch,
            context=args.context,
            kv_dtype=args.kv_dtype,
            bandwidth_bytes_per_s=bandwidth,
        )
        rows.append({
            "scenario": scenario, "batch": batch, "prompt_len": args.context,
            "tokens_per_s": round(result.tokens_per_s, 1), "ms_per_step": round(result.ms_per_step, 3),
            "gbps": round(step_bytes / (result.ms_per_step * 1e-3) / 1e9, 1),
            "roofline_tokens_per_s": round(roof, 1), "pct_roofline": round(100 * result.tokens_per_s / roof, 1),
            "overlap": overlap, "gpu_ms_per_step": _ms(result.gpu_ms_per_step),
            "host_ms_per_step": _ms(result.host_ms_per_step), "overlapped_steps": result.overlapped_steps,
        })  # fmt: skip
        _log(
            f"  {scenario} batch {batch}: {result.tokens_per_s:.1f} tok/s ({result.ms_per_step:.2f} ms/step, "
            f"GPU {result.gpu_ms_per_step or 0:.2f} ms, host adds {result.host_ms_per_step or 0:.2f} ms)"
        )
    engine.overlap = modes[0][1]
    for batch in args.sampled_batches:  # Gemma 4's default sampling through the batched sampler
        result = runs.decode_speed(
            engine, batch=batch, context=args.context, steps=args.steps, sampling=runs.GEMMA_SAMPLING
        )
        greedy = next((r for r in rows if r["scenario"] == "decode" and r["batch"] == batch), None)
        if greedy is None:  # a batch not among --decode-batches: its greedy speed for the comparison
            greedy_tps = runs.decode_speed(
                engine, batch=batch, context=args.context, steps=args.steps
            ).tokens_per_s
        else:
            greedy_tps = greedy["tokens_per_s"]
        rows.append({
            "scenario": "decode_sampled", "batch": batch, "prompt_len": args.context,
            "tokens_per_s": round(result.tokens_per_s, 1), "ms_per_step": round(result.ms_per_step, 3),
            "vs_greedy": round(result.tokens_per_s / greedy_tps, 3), "greedy_tokens_per_s": round(greedy_tps, 1),
        })  # fmt: skip
        _log(f"  decode batch {batch}, sampled (t=1, top-p 0.95, top-k 64): {result.tokens_per_s:.1f} tok/s")
    for length in args.prefill:
        result = runs.prefill_speed(engine, prompt_len=length)
        rows.append({"scenario": "prefill", "batch": 1, "prompt_len": length, "chunk": engine.config.max_num_batched_tokens,
                     "tokens_per_s": round(result.tokens_per_s, 1)})  # fmt: skip
        rows.append({"scenario": "ttft", "batch": 1, "prompt_len": length, "ms": round(result.ttft_ms, 1)})
        _log(f"  prefill {length}: {result.tokens_per_s:.0f} tok/s, TTFT {result.ttft_ms:.0f} ms")
    if args.profile:
        for batch in args.decode_batches:
            _log(profile_decode_step(engine, batch=batch, context=args.context))
    if args.fp8_lm_head:  # the same decode steps with logits from an FP8 copy of the output projection
        model.use_fp8_lm_head()
        if engine.warmup is not None:  # the FP8 head's kernels at every step size, as `serve --fp8-lm-head`
            engine.warm_up()  # compiles them at start (else the prompts' prefill steps below compile them)
        if engine.graphs is not None:
            engine.graphs.capture()  # the graphs hold the kernels of the BF16 head: capture again
        for batch in args.decode_batches:
            result = runs.decode_speed(engine, batch=batch, context=args.context, steps=args.steps)
            _, roof = runs.decode_roofline(
                cfg, weights, batch=batch, context=args.context, kv_dtype=args.kv_dtype,
                bandwidth_bytes_per_s=bandwidth, fp8_lm_head=True,
            )  # fmt: skip
            rows.append({
                "scenario": "decode_fp8_lm_head", "batch": batch, "prompt_len": args.context,
                "tokens_per_s": round(result.tokens_per_s, 1), "ms_per_step": round(result.ms_per_step, 3),
                "roofline_tokens_per_s": round(roof, 1), "pct_roofline": round(100 * result.tokens_per_s / roof, 1),
            })  # fmt: skip
            _log(f"  decode batch {batch}, FP8 lm_head: {result.tokens_per_s:.1f} tok/s")
    info = {
        "model": label,
        "weights_gib": round(weights_gib, 3),
        "planner_weights_gib": round(weights.text_bytes / 2**30, 3),
        "linear_copies_gib": round(copies / 2**30, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "kv_pool_tokens": engine.pool_tokens,
        "bandwidth_gbps": round(bandwidth / 1e9),
    }
    del engine, model
    if getattr(args, "parallel_group", None) is not None:
        args.parallel_group.close()
    gc.collect()
    torch.cuda.empty_cache()
    return info


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def profile_decode_step(engine: Engine, batch: int = 1, context: int = 256, top: int = 25) -> str:
    """The kernels of one decode step of `batch` sequences with `context`-token prompts, by total GPU time: a
    graph replay when the profiler sees into graphs, else the same step run eagerly."""
    from torch.profiler import ProfilerActivity, profile

    def one_step(graphs_on: bool):
        graphs = engine.graphs
        engine.graphs = graphs if graphs_on else None
        try:
            reqs = runs.start_batch(engine, batch=batch, context=context, seed=7)
            engine.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
            runs.end_batch(engine, reqs)
        finally:
            engine.graphs = graphs
        return [e for e in prof.key_averages() if e.device_type.name == "CUDA"]

    mode = "graph replay"
    events = one_step(engine.graphs is not None)
    if sum(e.count for e in events) < 50:  # the replay is opaque to this profiler: profile it eagerly
        mode, events = "eager", one_step(False)
    total = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    lines = [
        f"one decode step, batch {batch}, {context}-token prompts ({mode}): {launches} kernels, "
        f"{total / 1e3:.2f} ms of GPU time"
    ]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"{e.self_device_time_total / 1e3:8.3f} ms {e.count:5}x  {e.key[:90]}")
    return "\n".join(lines)


def measure_hf(args: argparse.Namespace, rows: list[dict]) -> None:
    from nvfp4kit.bench import hf_baseline as hf

    raw = None if args.model else hf.preset_raw_config(PRESET_DIR / f"{args.preset}.json")
    model = hf.load_hf_model(preset_config=raw, path=args.model)
    cfg = load_config(args.model) if args.model else load_preset(args.preset)
    for row in rows:
        if row["scenario"] == "decode" and row["batch"] in args.hf_batches:
            prompts = [runs.random_prompt(cfg, args.context, seed=b) for b in range(row["batch"])]
            tps = hf.hf_decode_speed(model, prompts, new_tokens=args.hf_tokens)
        elif row["scenario"] == "prefill" and row["prompt_len"] <= args.hf_max_prefill:
            tps = hf.hf_prefill_speed(model, runs.random_prompt(cfg, row["prompt_len"], seed=123))
        else:
            continue
        row.update(baseline="hf-transformers-bf16", baseline_tokens_per_s=round(tps, 1))
        _log(f"  HF {row['scenario']} batch {row['batch']} len {row['prompt_len']}: {tps:.1f} tok/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_engine_benchmark(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("bench engine needs a CUDA GPU")
    rows: list[dict] = []
    result = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": "nvfp4kit bench engine " + " ".join(sys.argv[sys.argv.index("engine") + 1 :])
        if "engine" in sys.argv
        else "nvfp4kit bench engine",
        "rows": rows,
    }
    result["engine"] = measure_engine(args, rows)
    if args.baseline == "hf":
        measure_hf(args, rows)
    for row in rows:  # every row carries the issue's columns; None where this run did not measure one
        for key in ("tokens_per_s", "pct_roofline", "baseline", "baseline_tokens_per_s"):
            row.setdefault(key, None)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(format_rows(result))
    return 0


def format_rows(result: dict) -> str:
    info = result["engine"]
    lines = [
        f"{result['card']}: {info['model']}, weights {info['weights_gib']} GiB (planner {info['planner_weights_gib']}),"
        f" peak {info['peak_gib']} GiB",
        f"{'scenario':11} {'batch':>5} {'prompt':>7} {'tok/s':>9} {'%roof':>6} {'ms':>8} {'baseline tok/s':>15}"
        f" {'GPU ms':>7} {'host ms':>7}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['scenario']:11} {r['batch']:5} {r['prompt_len']:7} {r.get('tokens_per_s') or 0:9.1f} "
            f"{r.get('pct_roofline') or 0:6.1f} {r.get('ms_per_step', r.get('ms')) or 0:8.2f} "
            f"{r.get('baseline_tokens_per_s') or 0:15.1f} {r.get('gpu_ms_per_step') or 0:7.3f} "
            f"{r.get('host_ms_per_step') or 0:7.3f}"
        )
    return "\n".join(lines)


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser(
        "engine", help="engine decode/prefill/TTFT on the GPU vs roofline and HF transformers (CUDA only)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint folder (default: random weights of --preset, no download)")
    src.add_argument(
        "--preset", default="gemma-4-26b-a4b", help="model shape for random weights (%(default)s)"
    )
    p.add_argument("--weights", choices=("nvfp4", "bf16"), default="nvfp4", help="random weights' format")
    p.add_argument("--kv-dtype", default="fp8_e5m2", help="KV cache dtype (default: %(default)s)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64], help="decode batch sizes")
    p.add_argument(
        "--sampled-batches", type=int, nargs="*", default=[16],
        help="decode batch sizes also timed with Gemma 4's default sampling (temperature 1, top-p 0.95, top-k 64)",
    )  # fmt: skip
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--prefill", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt lengths")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="max tokens per step (default: the engine's for this card, 8192 with 70+ GiB, 2048 below; sessions "
        "4-6 measured 2048). Each sequence's sliding ring holds window + min(chunk, 512; 2048 with 70+ GiB)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--prefill-graphs", type=token_counts, default=None, metavar="N,N,...",
        help="token counts of the prefill steps captured in CUDA graphs, as `serve --prefill-graphs` (default: the "
        "card's; 'none': eager prefill steps)",
    )  # fmt: skip
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
        help="split the model over N GPUs (one process each; every rank captures its decode graphs)",
    )  # fmt: skip
    p.add_argument(
        "--moe-parallel", choices=("experts", "tensor"), default="experts",
        help="with --tensor-parallel-size: MoE experts split across GPUs (experts) or every expert split by "
        "width (tensor); default %(default)s",
    )  # fmt: skip
    p.add_argument(
        "--overlap", choices=("on", "off", "both"), default="on",
        help="decode with the overlap scheduler (on), without it (off), or both (decode_sync rows for off); "
        "decode rows report GPU ms per step (CUDA events) and the host ms the GPU waits for (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--fp8-lm-head", action="store_true", help="also time decode with the FP8 lm_head copy")
    p.add_argument(
        "--linear-copies", choices=("auto", "on", "off"), default="auto",
        help="BF16 copies of the attention and dense-MLP weights, read by cuBLAS at steps of 48+ tokens, as `serve "
        "--linear-copies` (auto: on where they take <= 5%% of the card; off: the 4-bit kernels at every size)",
    )  # fmt: skip
    p.add_argument(
        "--profile",
        action="store_true",
        help="print the kernels of one decode step at each --decode-batches size",
    )
    p.add_argument("--baseline", choices=("hf", "none"), default="hf", help="HF transformers BF16 baseline")
    p.add_argument(
        "--hf-batches", type=int, nargs="+", default=[1, 16], help="decode batches for the baseline"
    )
    p.add_argument("--hf-tokens", type=int, default=12, help="tokens the baseline generates per measurement")
    p.add_argument("--hf-max-prefill", type=int, default=8192, help="longest prompt the baseline prefills")
    p.add_argument("--bandwidth-gbps", type=float, default=3350, help="roofline bandwidth for unlisted cards")
    p.add_argument("--json", help="write the result rows as JSON here (e.g. docs/results/bench-<card>.json)")
    p.set_defaults(func=run_engine_benchmark)
