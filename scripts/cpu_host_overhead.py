"""Host time of an engine step, measured on the CPU: the GPU path with every Triton launch compiled, not run.

Inside `tuning.cross_compile.compile_for` each launch goes through Triton's whole dispatch (argument binding,
specialisation, cache lookup) and stops before the driver call; the model has the 26B-A4B's structure (30
layers, 5 sliding : 1 global, K=V global layers, 128 experts top-8, the dense MLP beside them) at tiny widths,
so torch's ops cost their dispatch and almost no arithmetic (allocations are zero-filled: kernel outputs that
torch indexes with, such as routing ids, must be valid). What is left of a step's wall time is what the
host spends on it: our Python, Triton's dispatch and torch's. On the H200 that host time was what a step that
prefills waited for (docs/benchmarks.md, session 9: 87-114 ms to queue a 706-token mixed step).

    PYTHONPATH=src python scripts/cpu_host_overhead.py [--decoding 96 --prompt 610] [--profile 25]

Prints the mixed step's wall ms, host ms per layer, launches per step, and with --profile the functions with the
most own time (cProfile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_mixed_step_profile import add_arrivals, host_profile, host_split  # noqa: E402

from nvfp4kit.config import config_from_dict  # noqa: E402
from nvfp4kit.engine.engine import Engine, EngineConfig  # noqa: E402
from nvfp4kit.kernels.backend import TritonBackend  # noqa: E402
from nvfp4kit.sampling import SamplingParams  # noqa: E402
from nvfp4kit.testing.random_model import random_model  # noqa: E402
from nvfp4kit.testing.tiny_config import tiny_text_config  # noqa: E402
from nvfp4kit.tuning.cross_compile import compile_for  # noqa: E402


def build_engine(args) -> tuple[Engine, object]:
    text = tiny_text_config(
        "moe",
        num_hidden_layers=30,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=32,
        sliding_window=1024,
    )
    cfg = config_from_dict(text)
    model = random_model(cfg, quantized=True, device="cpu", backend=TritonBackend())
    most = args.decoding + 2
    config = EngineConfig(
        kv_dtype="fp8_e4m3", max_num_seqs=most, max_num_batched_tokens=args.chunk, block_size=16,
        num_kv_tokens=most * (args.context + args.prompt + 256) + 4096, max_model_len=args.context + 1024,
        prefix_caching=False, overlap_schedule=False, admission_delay=0, attention_backend="triton",
    )  # fmt: skip
    return Engine(model, None, config=config), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoding", type=int, default=96, help="sequences decoding when the prompt arrives")
    ap.add_argument("--context", type=int, default=600, help="their prompt length")
    ap.add_argument("--prompt", type=int, default=610, help="tokens of the arriving prompt")
    ap.add_argument("--chunk", type=int, default=8192, help="tokens a step (--max-num-batched-tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="print this many functions by own time (cProfile)")
    ap.add_argument("--capability", default="9.0", help="the card the kernels compile for (default: H200's)")
    args = ap.parse_args()
    args.out, args.top = None, args.profile
    major, minor = (int(x) for x in args.capability.split("."))
    torch.set_num_threads(1)
    with compile_for((major, minor), 132, zero_allocations=True) as launched:
        engine, cfg = build_engine(args)
        add_arrivals(engine, cfg, 2, args.prompt, seed=50_000)  # compile every prefill kernel first
        while engine.has_unfinished():
            engine.step()
        forever = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)
        for i in range(args.decoding):
            engine.add_request([5 + (i + j) % 300 for j in range(args.context)], forever)
        while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
            engine.step()
        for _ in range(3):
            engine.step()
        rows = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.step()
            decode_ms = (time.perf_counter() - t0) * 1e3
            before = len(launched)
            split = host_split(engine, cfg, args)
            rows.append({"decode_ms": round(decode_ms, 2), **split, "launches": len(launched) - before})
        top = host_profile(engine, cfg, args) if args.profile else []
    print("| decode step ms (eager) | mixed step ms | host ms before layer 0 | host ms a layer | launches |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decode_ms']} | {r['wall_ms']} | {r['before_layer0_ms']} | {r['per_layer_host_ms']} | "
              f"{r['launches']} |")  # fmt: skip
    for r in top:
        print(f"{r['own_ms']:9.2f} ms own {r['cumulative_ms']:9.2f} cum {r['calls']:6d}x {r['function']}")


if __name__ == "__main__":
    main()
