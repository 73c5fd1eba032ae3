"""`nvfp4kit quantize SRC OUT`: a BF16 Gemma 4 checkpoint to NVFP4 (ModelOpt 0.47's format), layer by layer."""

from __future__ import annotations

import argparse
import sys

import torch

from nvfp4kit.quant import CALIBRATION_METHODS, RECIPES, quantize

DESCRIPTION = """\
Quantize a BF16 Gemma 4 checkpoint to NVFP4 in ModelOpt 0.47's checkpoint format (loads in nvfp4kit, vLLM,
SGLang and TensorRT-LLM). Streams one decoder layer at a time from the shards: RAM holds one layer plus the
calibration activations. Default recipe: every text linear NVFP4 (attention, dense MLP, experts); embeddings,
lm_head, routers and vision/audio towers stay BF16. The output folder appears only when complete.

Every --calibration method writes the same standard ModelOpt NVFP4 tensors; methods other than max write the
max export to a hidden folder next to OUT first, then re-quantize it layer by layer into OUT with the same
calibration text (on the demo model gptq cuts the mean KL to BF16 to 0.60x of max's, gptq-guided to 0.57x)."""


def calibration_help() -> str:
    """The epilog: one line per calibration method, from the registry."""
    width = max(len(name) for name in CALIBRATION_METHODS)
    lines = [f"  {m.name:<{width}}  {m.help}" for m in CALIBRATION_METHODS.values()]
    return "calibration methods (--calibration):\n" + "\n".join(lines)


def register(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = calibration_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("src", help="BF16 checkpoint folder (config.json, safetensors shards, tokenizer)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--recipe", choices=RECIPES, default="all-nvfp4", help="what to quantize (default: %(default)s)"
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep modules matching this fnmatch pattern in BF16, e.g. '*layers.0.*' (repeatable)",
    )
    p.add_argument(
        "--calibration",
        choices=tuple(CALIBRATION_METHODS),
        default="max",
        help="how weight scales and codes are chosen (default: %(default)s; the methods are listed below)",
    )
    p.add_argument(
        "--calib-data",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="calibration text: .txt, .jsonl ({'text'} or {'messages'} a line) or .json; default: built-in corpus",
    )
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (default: %(default)s)")
    p.add_argument(
        "--seq-len", type=int, default=512, help="tokens per calibration sample (default: %(default)s)"
    )
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is done)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where calibration runs")
    p.add_argument(
        "--calib-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="dtype of the calibration forward (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but no CUDA device is available", file=sys.stderr)
        return 1
    try:
        report = quantize(
            args.src,
            args.out,
            recipe=args.recipe,
            exclude=args.exclude,
            calibration=args.calibration,
            calib_data=args.calib_data,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            device=args.device,
            calib_dtype=None if args.calib_dtype == "auto" else args.calib_dtype,
            progress=not args.no_progress,
        )
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.output}: {report.quantized_linears} NVFP4 modules (linears, expert sets) in {report.layers} layers, "
        f"{report.output_bytes / 1e9:.2f} GB, {report.calibration} calibration on {report.samples} samples / "
        f"{report.tokens} tokens, {report.seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB"
    )
    print(f"kept in BF16 (exclude_modules): {', '.join(report.exclude_modules)}")
    return 0
