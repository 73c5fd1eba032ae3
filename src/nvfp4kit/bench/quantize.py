"""`nvfp4kit bench quantize`: seconds per layer and peak memory of each calibration method at a model's real shapes.

Random BF16 checkpoints of the preset's exact shapes (1 and 6 layers by default, quantize_shapes.py) are written
once under --work, then each (depth, method) runs `quantize` in its own process (quantize_worker.py) with the
default calibration (128 x 512 tokens of the built-in corpus). Reported: wall time, time per layer, the refine
pass's stages, peak RSS and GPU memory; JSON rows with --json (e.g. docs/results/quantize-<card>.json).
A 1-layer run includes one-time costs (start-up, compiles, the embeddings); deeper runs give the steady rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(src: Path, out: Path, depth: int, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "nvfp4kit.bench.quantize_worker", str(src), str(out), method, args.device,
           str(args.num_samples), str(args.seq_len), args.asymmetric]  # fmt: skip
    row: dict = {"layers": depth, "method": method}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    except subprocess.TimeoutExpired:
        return row | {"error": f"timed out after {args.timeout} s"}
    finally:
        shutil.rmtree(out, ignore_errors=True)  # disk: a 6-layer 26B-A4B export is about 3 GB
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        return row | {"error": (proc.stderr or proc.stdout)[-2000:]}
    row |= json.loads(found[-1].removeprefix("RESULT "))
    row["process_seconds"] = round(time.perf_counter() - started, 2)
    row["seconds_per_layer"] = round(row["seconds"] / depth, 2)
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'layers':>6} {'method':>12} {'total s':>8} {'s/layer':>8} {'RSS GiB':>8} {'GPU GiB':>8}  stages (s)"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['layers']:>6} {r['method']:>12}  ERROR {r['error'][-300:]}")
            continue
        stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
        lines.append(
            f"{r['layers']:>6} {r['method']:>12} {r['seconds']:>8} {r['seconds_per_layer']:>8} "
            f"{r['peak_rss_gib']:>8} {r['gpu_peak_gib']:>8}  {stages}"
        )
    return "\n".join(lines)


def run_quantize_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from nvfp4kit.bench.quantize_shapes import build_checkpoints

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench quantize: --device cuda needs a GPU (use --device cpu --small for a dry run)",
            file=sys.stderr,
        )
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="nvfp4kit-bench-quantize-"))
    started = time.perf_counter()
    ckpts = build_checkpoints(
        work, sorted(set(args.layers)), preset=args.preset, small=args.small, device=args.device
    )
    print(
        f"random {args.preset} checkpoints in {work} ({time.perf_counter() - started:.1f} s)", file=sys.stderr
    )
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows: list[dict] = []
    runs = [(d, m) for d in args.layers for m in args.methods]
    for depth, method in tqdm(runs, desc="bench quantize", unit="run", disable=not sys.stderr.isatty()):
        rows.append(run_one(ckpts[depth], work / f"out-{depth}-{method}", depth, method, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:  # after every run: a long sweep cut short keeps its rows
            result = {"card": card, "torch": torch.__version__, "preset": args.preset, "small": args.small,
                      "num_samples": args.num_samples, "seq_len": args.seq_len, "rows": rows}  # fmt: skip
            Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{card}, {args.preset}{' (small)' if args.small else ''}, {args.num_samples} x {args.seq_len} "
          "calibration tokens")  # fmt: skip
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    from nvfp4kit.quant.calib_methods import CALIBRATION_METHODS

    p = scenarios.add_parser(
        "quantize",
        help="seconds per layer and peak memory of each calibration method at the model's real shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="gemma-4-26b-a4b", help="model shapes (default: %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 6], help="checkpoint depths (default: 1 6)")
    p.add_argument(
        "--methods", nargs="+", default=["max", "gptq"], choices=sorted(CALIBRATION_METHODS),
        help="calibration methods (default: max gptq)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda", help="where quantize runs (default: cuda)")
    p.add_argument("--small", action="store_true", help="toy widths of the same structure, for a CPU dry run")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default: 512)")
    p.add_argument(
        "--asymmetric", choices=["default", "on", "off"], default="default",
        help="gptq's full-precision twin stream (quant/calib_asym.py); default: the method's own setting",
    )  # fmt: skip
    p.add_argument("--timeout", type=int, default=900, help="seconds one run may take (default: 900)")
    p.add_argument(
        "--work", help="folder for the random checkpoints, kept for reuse (default: a temporary one)"
    )
    p.add_argument("--json", help="write the rows here (e.g. docs/results/quantize-<card>.json)")
    p.set_defaults(func=run_quantize_bench)
