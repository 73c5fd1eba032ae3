"""`nvfp4kit bench capacity`: the 24 GB claim, emulated on a larger card.

The engine gets `--gpu-memory-budget 24GiB` (start-up sizing plans weights, reserve, CUDA graphs and KV pools
inside it) and the process is also capped with `torch.cuda.set_per_process_memory_fraction`, so any allocation
beyond the budget fails loudly instead of borrowing the big card's memory. Then a request at a long context
(default 200K tokens) runs under the cap, and again without the cap on an engine sized by the default
utilization: the greedy tokens and their log-probabilities must match.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from nvfp4kit.bench.engine_runs import random_prompt
from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.sizing import MemoryOptions, format_size, measure_device_memory, plan_engine_memory
from nvfp4kit.plan.weights import weights_from_config
from nvfp4kit.sampling import SamplingParams


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _long_request(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float], float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(prompt, params)
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for event in engine.step():
            tokens.append(event.token_id)
            logprobs.append(event.logprob)
    torch.cuda.synchronize()
    return tokens, logprobs, time.perf_counter() - t0


def _engine(model, cfg, args, memory, options: MemoryOptions) -> tuple[Engine, object]:
    config = EngineConfig(
        kv_dtype=args.kv_dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.chunk
    )
    weights = weights_from_config(cfg).text_bytes
    plan = plan_engine_memory(
        cfg, weights_bytes=weights, memory=memory, options=options, config=config, kv_dtype=args.kv_dtype
    )
    _log(plan.format())
    config = EngineConfig(**{**config.__dict__, "kv_cache_memory": plan.kv_cache_memory})
    return Engine(model, None, config=config), plan


def run_capacity(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("bench capacity needs a CUDA GPU")
    from nvfp4kit.testing.random_model import random_model

    budget = MemoryOptions.parse(gpu_memory_budget=args.budget)
    memory = measure_device_memory("cuda")
    if budget.gpu_memory_budget > memory.total_bytes:
        raise ValueError(
            f"the budget {args.budget} is larger than this card ({format_size(memory.total_bytes)})"
        )
    torch.cuda.set_per_process_memory_fraction(budget.gpu_memory_budget / memory.total_bytes)
    cfg = load_preset(args.preset)
    model = random_model(cfg, quantized=True, device="cuda")
    engine, plan = _engine(model, cfg, args, memory, budget)
    pool_tokens = engine.pool_tokens
    _log(
        f"capped at {args.budget}: global pool {pool_tokens:,} tokens; running a {args.context:,}-token request"
    )
    prompt = random_prompt(cfg, args.context, seed=2024)
    capped_tokens, capped_lp, seconds = _long_request(engine, prompt, args.new_tokens)
    peak = torch.cuda.max_memory_reserved()
    del engine
    gc.collect()
    torch.cuda.empty_cache()

    torch.cuda.set_per_process_memory_fraction(1.0)
    engine, _ = _engine(model, cfg, args, measure_device_memory("cuda"), MemoryOptions())
    free_tokens, free_lp, _ = _long_request(engine, prompt, args.new_tokens)
    same = capped_tokens == free_tokens
    worst = max(abs(a - b) for a, b in zip(capped_lp, free_lp)) if same else float("nan")
    row = {
        "scenario": "capacity_24gb", "batch": 1, "prompt_len": args.context,
        "tokens_per_s": round(args.context / seconds, 1), "pct_roofline": None,
        "baseline": "seed SGLang global pool (model card)", "baseline_tokens_per_s": None,
        "pool_tokens": pool_tokens, "seed_pool_tokens": 232_734, "budget": args.budget,
        "peak_reserved_gib": round(peak / 2**30, 3), "max_context": plan.pool.max_context,
        "matches_uncapped": same, "max_logprob_diff": worst,
    }  # fmt: skip
    _write(args, row)
    print(
        f"{torch.cuda.get_device_name()} as a {args.budget} card: global pool {pool_tokens:,} FP8 tokens "
        f"(seed 232,734), peak reserved {row['peak_reserved_gib']} GiB, {args.context:,}-token request in "
        f"{seconds:.1f} s; tokens {'match' if same else 'DIFFER from'} the uncapped engine "
        f"(capped {capped_tokens}, uncapped {free_tokens}, max logprob diff {worst:.2e})"
    )
    if not worst <= args.max_logprob_diff:  # nan (tokens differ) fails too
        print(
            f"FAIL: logprobs differ by {worst:.3g} > {args.max_logprob_diff} between pool sizes",
            file=sys.stderr,
        )
    return 0 if same and worst <= args.max_logprob_diff and pool_tokens >= args.min_pool_tokens else 1


def _write(args: argparse.Namespace, row: dict) -> None:
    """Replace the capacity row of the bench JSON (the engine scenario's rows stay)."""
    if not args.json:
        return
    path = Path(args.json)
    result = (
        json.loads(path.read_text()) if path.exists() else {"card": torch.cuda.get_device_name(), "rows": []}
    )
    result["rows"] = [r for r in result["rows"] if r.get("scenario") != row["scenario"]] + [row]
    result.setdefault("commands", {})["capacity"] = "nvfp4kit bench capacity " + " ".join(
        sys.argv[sys.argv.index("capacity") + 1 :] if "capacity" in sys.argv else []
    )
    result["date"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(result, indent=1) + "\n")


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser(
        "capacity", help="a 24 GB card emulated: KV capacity and a 200K-token request (CUDA)"
    )
    p.add_argument("--budget", default="24GiB", help="the card to emulate (default: %(default)s)")
    p.add_argument(
        "--preset", default="gemma-4-26b-a4b", help="model shape, random NVFP4 weights (%(default)s)"
    )
    p.add_argument("--kv-dtype", default="fp8_e5m2", help="KV cache dtype (default: %(default)s)")
    p.add_argument("--context", type=int, default=200_000, help="prompt tokens of the long request")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens generated after it")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences the engine is sized for")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (max tokens per step)")
    p.add_argument("--min-pool-tokens", type=int, default=400_000, help="exit 1 below this global pool size")
    p.add_argument(
        "--max-logprob-diff",
        type=float,
        default=1e-2,
        help="exit 1 if a greedy token's logprob differs more than this between the capped and uncapped engine",
    )
    p.add_argument("--json", help="bench JSON to update (its capacity_24gb row)")
    p.set_defaults(func=run_capacity)
