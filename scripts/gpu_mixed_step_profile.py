"""Where a serving step's time goes when prompts arrive while others decode (issue 17).

Session 8 on the H200 (`bench serve`, concurrency 100, ~610-token prompts): steps that prefilled a new prompt
beside ~98 decodes averaged 119 ms, against ~15 ms for a decode step, and took 45% of the run. This script builds
that step on its own: `--decoding` sequences decode (context `--context`), then `--arrivals` new prompts of
`--prompt` tokens join one step. It times, with the same engine, a decode step, the mixed steps (wall and GPU time
between CUDA events), the same prompts prefilled alone, and prints the kernels of one mixed step under the torch
profiler (count, GPU ms by kernel) so that host time (wall - kernel time) and each kernel's share show.

Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_mixed_step_profile.py [--out OUT]
    [--prefill-graphs 1024 2048] (steps of up to 2048 tokens replayed from CUDA graphs: compare with the eager rows)
CPU smoke test: PYTHONPATH=src python3 scripts/gpu_mixed_step_profile.py --shape tiny-moe --device cpu --decoding 4
    --context 24 --prompt 20
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from nvfp4kit.bench.engine_runs import random_prompt
from nvfp4kit.config import config_from_dict
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_llm import random_shape_config
from nvfp4kit.testing.random_model import random_model


def timed_step(engine: Engine) -> tuple[float, float, list[str]]:
    """(wall ms, ms between CUDA events around the step, the step's kinds) of one engine step."""
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    engine.step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    return wall, start.elapsed_time(end) if cuda else wall, list(engine._step_kinds)


def add_arrivals(engine: Engine, cfg, count: int, length: int, seed: int) -> None:
    once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i in range(count):
        engine.add_request(random_prompt(cfg, length, seed=seed + i), once)


def kernel_table(engine: Engine, cfg, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    add_arrivals(engine, cfg, 1, args.prompt, seed=90_000)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            totals[e.key[:70]] += e.self_device_time_total / 1e3
            counts[e.key[:70]] += e.count
    top = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
    return {
        "wall_ms_under_profiler": round(wall, 2),
        "kernels": sum(counts.values()),
        "kernel_ms": round(sum(totals.values()), 2),
        "top": [{"kernel": k, "ms": round(ms, 3), "calls": counts[k]} for k, ms in top],
    }


def host_profile(engine: Engine, cfg, args) -> list[dict]:
    """The host's own time in one mixed step by function (cProfile; kernels run asynchronously meanwhile, so a
    function that waits on the GPU shows the wait as its own time)."""
    import cProfile
    import pstats

    add_arrivals(engine, cfg, 1, args.prompt, seed=95_000)
    profiler = cProfile.Profile()
    profiler.enable()
    engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(
            args.out / "mixed_step.pstats"
        )  # `python -m pstats` reads it: callers, cumulative
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        rows.append({"function": f"{Path(file).name}:{line}:{name}", "calls": calls,
                     "own_ms": round(own * 1e3, 3), "cumulative_ms": round(cumulative * 1e3, 3)})  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_ms"])[: args.top]


def host_split(engine: Engine, cfg, args) -> dict:
    """Host time of one mixed step without a profiler: how long `hidden_states` takes to queue every layer (no
    sync inside), per layer and in the embedding/metadata before layer 0, against the step's wall time. A step
    whose queueing time is close to its wall time is bound by the host, not by its kernels."""
    model = engine.model
    marks: list[float] = []

    def timed(step):
        def run(*a, **k):
            marks.append(time.perf_counter())
            return step(*a, **k)

        return run

    for layer in model.layers:
        layer.step = timed(layer.step)
    plain = model.hidden_states
    spans: dict[str, float] = {}

    def hidden_states(*a, **k):
        t0 = time.perf_counter()
        out = plain(*a, **k)
        spans["hidden_states"] = time.perf_counter() - t0
        spans["before_layer0"] = (marks[0] - t0) if marks else 0.0
        spans["layers"] = (time.perf_counter() - marks[0]) if marks else 0.0
        return out

    model.hidden_states = hidden_states
    add_arrivals(engine, cfg, 1, args.prompt, seed=97_000)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model.hidden_states
    for layer in model.layers:
        del layer.step
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "wall_ms": round(wall * 1e3, 2),
        "queue_ms": round(spans.get("hidden_states", 0) * 1e3, 2),
        "before_layer0_ms": round(spans.get("before_layer0", 0) * 1e3, 2),
        "per_layer_host_ms": round(sum(gaps) / max(1, len(gaps)) * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gemma-4-26b-a4b", help="a preset or tiny-moe / tiny-dense")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decoding", type=int, default=96, help="sequences decoding when the prompts arrive")
    ap.add_argument("--context", type=int, default=600, help="their prompt length")
    ap.add_argument("--prompt", type=int, default=610, help="tokens of each arriving prompt")
    ap.add_argument("--arrivals", type=int, nargs="+", default=[1, 2, 4, 8], help="prompts joining one step")
    ap.add_argument("--chunk", type=int, default=8192, help="tokens a step (--max-num-batched-tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument(
        "--prefill-graphs",
        type=int,
        nargs="*",
        default=[],
        help="token counts of prefill CUDA graphs to capture",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON into this folder")
    args = ap.parse_args()

    _, text, _ = random_shape_config(args.shape)
    cfg = config_from_dict(text)
    model = random_model(cfg, quantized=True, device=args.device)
    most = args.decoding + max(args.arrivals) + 1
    config = EngineConfig(
        kv_dtype="fp8_e4m3" if args.device == "cuda" else "bf16", max_num_seqs=most,
        max_num_batched_tokens=args.chunk, num_kv_tokens=most * (args.context + args.prompt + 256) + 4096, max_model_len=args.context + 1024,
        prefix_caching=False, overlap_schedule=False, admission_delay=0,  # one step's work per step() call
        prefill_graphs=tuple(args.prefill_graphs),
    )  # fmt: skip
    engine = Engine(model, None, config=config)
    add_arrivals(engine, cfg, 2, args.prompt, seed=50_000)  # compile the prefill kernels before timing
    while engine.has_unfinished():
        engine.step()
    steps = 8 + args.repeats * (
        2 * len(args.arrivals) + 2
    )  # decode steps the decoders live through, and more
    forever = SamplingParams(max_tokens=steps + 64, temperature=0, ignore_eos=True)
    for i in range(args.decoding):
        engine.add_request(random_prompt(cfg, args.context, seed=i), forever)
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()

    rows = []

    def record(scenario: str, tokens: int, samples: list[tuple[float, float, list[str]]]) -> None:
        wall = sorted(s[0] for s in samples)[len(samples) // 2]
        gpu = sorted(s[1] for s in samples)[len(samples) // 2]
        rows.append({"scenario": scenario, "new_tokens": tokens, "wall_ms": round(wall, 2),
                     "event_ms": round(gpu, 2), "kinds": samples[0][2]})  # fmt: skip

    record(f"decode {args.decoding}", 0, [timed_step(engine) for _ in range(args.repeats)])
    for count in args.arrivals:
        samples = []
        for rep in range(args.repeats):
            add_arrivals(engine, cfg, count, args.prompt, seed=10_000 * (count + 1) + 100 * rep)
            samples.append(timed_step(engine))
        record(f"decode {args.decoding} + {count} prompt(s)", count * args.prompt, samples)
    table = kernel_table(engine, cfg, args)
    host = host_profile(engine, cfg, args)
    split = [host_split(engine, cfg, args) for _ in range(args.repeats)]
    for req in list(engine.requests.values()):  # the decoders go; prompts alone follow
        engine.abort(req.request_id)
    while engine.has_unfinished():
        engine.step()
    for count in args.arrivals:
        samples = []
        for rep in range(args.repeats):
            add_arrivals(engine, cfg, count, args.prompt, seed=70_000 + 100 * count + rep)
            samples.append(timed_step(engine))
            while engine.has_unfinished():
                engine.step()
        record(f"{count} prompt(s) alone", count * args.prompt, samples)

    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print(
        f"\n{name}: {args.shape}, {args.decoding} decoding at {args.context} tokens, prompts of {args.prompt}"
    )
    print(f"one mixed step (1 prompt) under the profiler: {table['kernels']} kernels, {table['kernel_ms']} ms of "
          f"kernels, {table['wall_ms_under_profiler']} ms wall")  # fmt: skip
    for t in table["top"]:
        print(f"  {t['ms']:8.3f} ms {t['calls']:5}x  {t['kernel']}")
    print("host functions of one mixed step by own time (cProfile):")
    for h in host:
        print(
            f"  {h['own_ms']:8.2f} ms own {h['cumulative_ms']:9.2f} ms cum {h['calls']:6}x  {h['function'][:80]}"
        )
    for sp in split:
        print(
            f"host split of a mixed step (1 prompt): wall {sp['wall_ms']} ms, hidden_states queued in "
            f"{sp['queue_ms']} ms ({sp['before_layer0_ms']} before layer 0, {sp['per_layer_host_ms']} a layer)"
        )
    print(f"{'scenario':34} {'new tokens':>10} {'wall ms':>9} {'event ms':>9}  kinds")
    for r in rows:
        print(
            f"{r['scenario']:34} {r['new_tokens']:10} {r['wall_ms']:9.2f} {r['event_ms']:9.2f}  {r['kinds']}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "card": name,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "profile": table,
            "host": host,
            "host_split": split,
        }
        (args.out / "mixed_step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
