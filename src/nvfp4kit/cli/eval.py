"""`nvfp4kit eval REF QUANT`: how closely a quantized checkpoint follows its reference (KL, top-1, perplexity)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Teacher-forced comparison of two checkpoints on the same token windows: mean, median and 99th-percentile
KL(ref || quant) per token over the full vocabulary, top-1 agreement, and the perplexity of both.
Without REF and QUANT it compares the built-in demo model with its NVFP4 export. Default data: a held-out
slice shipped with nvfp4kit (Python standard-library code and docs the demo model never saw, and chats)."""


def register(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("ref", nargs="?", help="reference checkpoint folder (default: the BF16 demo model)")
    p.add_argument("quant", nargs="?", help="quantized checkpoint folder (default: the NVFP4 demo model)")
    p.add_argument(
        "--data", nargs="+", action="extend", default=[], metavar="FILE",
        help="evaluation text: .jsonl ({'text'} a line) or plain text files (default: built-in held-out slice)",
    )  # fmt: skip
    p.add_argument(
        "--num-samples", type=int, default=64, help="token windows to compare (default: %(default)s)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )  # fmt: skip
    p.add_argument(
        "--low-memory", action="store_true",
        help="hold one model at a time; the reference logits wait in a temporary file on disk",
    )  # fmt: skip
    p.add_argument(
        "--fp8-lm-head", action="store_true",
        help="QUANT computes logits from an FP8 copy of its output projection (what `serve --fp8-lm-head` runs)",
    )  # fmt: skip
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
        help="run each model over N devices, one process each (implies --low-memory: one model at a time)",
    )  # fmt: skip
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _format(report) -> str:
    a = report.agreement
    rows = [
        ("reference", report.ref), ("quantized", report.quant),
        ("windows / tokens", f"{a.num_sequences} / {a.num_tokens} (seq-len {report.seq_len})"),
        ("KL mean", f"{a.kl_mean:.5f}"), ("KL median", f"{a.kl_median:.5f}"), ("KL p99", f"{a.kl_p99:.5f}"),
        ("KL max", f"{a.kl_max:.5f}"), ("top-1 agreement", f"{100 * a.top1_agreement:.2f}%"),
        ("perplexity ref", f"{a.ppl_ref:.4f}"), ("perplexity quant", f"{a.ppl_quant:.4f}"),
        ("weights ref / quant", f"{report.ref_bytes / 1e6:.2f} MB / {report.quant_bytes / 1e6:.2f} MB"),
        ("time", f"{report.seconds:.1f} s on {report.device}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    import torch

    from nvfp4kit.demo import demo_model_path
    from nvfp4kit.eval import DEFAULT_DATA, compare_checkpoints, load_samples
    from nvfp4kit.tokenizer import Tokenizer

    if args.ref is not None and args.quant is None:
        print("error: give both REF and QUANT, or neither (the demo pair)", file=sys.stderr)
        return 2
    ref = Path(args.ref) if args.ref else demo_model_path("bf16")
    quant = Path(args.quant) if args.quant else demo_model_path("nvfp4")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda was asked for but no CUDA device is available", file=sys.stderr)
        return 1
    data = args.data or [str(DEFAULT_DATA)]
    samples = load_samples(data, Tokenizer(ref), num_samples=args.num_samples, seq_len=args.seq_len)
    parallel = {}
    if args.tensor_parallel_size > 1:  # one process group at a time: the reference first, then QUANT
        from nvfp4kit.distributed.group import sequential_loader

        parallel = {"load": sequential_loader(args.tensor_parallel_size)}
    try:
        report = compare_checkpoints(
            ref, quant, samples, device=args.device, dtype=args.dtype,
            low_memory=args.low_memory or bool(parallel), progress=not args.no_progress and sys.stderr.isatty(),
            data=data, fp8_lm_head=args.fp8_lm_head, **parallel,
        )  # fmt: skip
    finally:
        if parallel:
            parallel["load"].close()
    print(_format(report))
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0
