"""`nvfp4kit plan MODEL`: what fits on a GPU (weights, KV pools, context, concurrency, decode ceiling)."""

from __future__ import annotations

import argparse
import json

from nvfp4kit.config import list_presets
from nvfp4kit.plan.gpus import DEFAULT_PRELOAD_USED, GPUS
from nvfp4kit.plan.kv import KV_DTYPE_BYTES
from nvfp4kit.plan.report import DEFAULT_CONTEXT, DEFAULT_GPU, build_plan
from nvfp4kit.plan.sglang import SEED_MEM_FRACTION, SEED_SWA_RATIO
from nvfp4kit.plan.text import format_plan
from nvfp4kit.plan.units import GiB, parse_bytes
from nvfp4kit.plan.weights import RECIPES

DESCRIPTION = """\
Plan a Gemma 4 model on a GPU, from arithmetic alone (no GPU, no tensor data read):
weights by component, KV-cache bytes per token per layer type, how the seed's stack (SGLang with
--mem-fraction-static / --swa-full-tokens-ratio) would size its two KV pools, nvfp4kit's own plan
(global-layer KV stored once for K=V layers, a per-request sliding-window ring, a computed runtime
reserve), and the decode roofline (bytes read per step over the card's bandwidth).
"""
EPILOG = f"""\
presets: {", ".join(list_presets()) or "(none installed)"}
GPUs: {", ".join(g.name for g in GPUS)}

examples:
  nvfp4kit plan gemma-4-26b-a4b --gpu "RTX 3090"
  nvfp4kit plan ./my-checkpoint --gpu h100 --context 131072 --concurrency 4 --json
  nvfp4kit plan gemma-4-26b-a4b --gpu-memory 24GiB --bandwidth 936GB --sglang-weights 17.81GiB
  nvfp4kit plan gemma-4-26b-a4b --gpu "RTX 3090" --no-vision   # text-only serving
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "model", metavar="MODEL", help="a checkpoint folder (config.json + safetensors) or a preset name"
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", metavar="NAME", help=f"a card from the catalog below (default {DEFAULT_GPU})")
    gpu.add_argument(
        "--gpu-memory", metavar="SIZE", type=_size,
        help="total GPU memory instead of a catalog card, e.g. 24GiB or 80GB (add --bandwidth for the roofline)",
    )  # fmt: skip
    p.add_argument(
        "--bandwidth", metavar="SIZE", type=_size,
        help="memory bandwidth per second for the roofline, e.g. 936GB (overrides the card's datasheet value)",
    )  # fmt: skip
    p.add_argument(
        "--kv-dtype", choices=list(KV_DTYPE_BYTES), default="fp8_e5m2",
        help="KV-cache element type: 1 byte for the FP8 types, 2 for bf16 (default fp8_e5m2, as the seed)",
    )  # fmt: skip
    p.add_argument(
        "--context", metavar="N", type=_positive_int,
        help=f"tokens per request for the concurrency and roofline rows (default {DEFAULT_CONTEXT:,}, "
        "capped at the model's max_position_embeddings)",
    )  # fmt: skip
    p.add_argument(
        "--concurrency", metavar="N", type=_positive_int,
        help="requests running at once: sizes the sliding rings held back from the global pool and the "
        "roofline batch (default: 1 for the pools; as many as fit at --context for the roofline)",
    )  # fmt: skip
    p.add_argument(
        "--recipe", choices=list(RECIPES), default="all-nvfp4",
        help="which text linears are NVFP4 when MODEL is a preset: all-nvfp4 (the seed: attention, dense MLP, "
        "experts), attention-bf16 (attention kept BF16), experts-only (the seed card's description of "
        "nvidia/Gemma-4-26B-A4B-NVFP4), bf16. A checkpoint is sized as stored.",
    )  # fmt: skip
    p.add_argument(
        "--mem-fraction-static", metavar="F", type=_fraction, default=SEED_MEM_FRACTION,
        help=f"SGLang's fraction of pre-load free memory for weights + KV (default {SEED_MEM_FRACTION}, the seed's)",
    )  # fmt: skip
    p.add_argument(
        "--swa-full-tokens-ratio", metavar="R", type=_fraction, default=SEED_SWA_RATIO,
        help=f"SGLang's sliding-pool tokens per global-pool token (default {SEED_SWA_RATIO}, the seed's; "
        "SGLang's own default is 0.8)",
    )  # fmt: skip
    p.add_argument(
        "--prefill-chunk", metavar="N", type=_positive_int, default=None,
        help="nvfp4kit's tokens a step (serve's --max-num-batched-tokens): sets the activation reserve and the "
        "sliding ring (window + chunk, the chunk counted up to 512, or 2048 with 70+ GiB: longer chunks attend "
        "sliding layers in passes) (default: as serve on that card, 8192 with 70+ GiB, 2048 below)",
    )  # fmt: skip
    p.add_argument(
        "--preload-used", metavar="SIZE", type=_size, default=DEFAULT_PRELOAD_USED,
        help=f"GPU memory in use before weights load: CUDA context, display, other processes "
        f"(default {DEFAULT_PRELOAD_USED / GiB:.2f}GiB, what the seed card's numbers imply on its RTX 3090)",
    )  # fmt: skip
    p.add_argument(
        "--sglang-weights", metavar="SIZE", type=_size,
        help="weights SGLang reports after loading (e.g. the seed card's 17.81GiB), instead of the "
        "checkpoint's bytes, for the SGLang column",
    )  # fmt: skip
    p.add_argument(
        "--k-and-v", action="store_true",
        help="plan nvfp4kit with K and V stored separately on K=V global layers (as SGLang/vLLM do)",
    )  # fmt: skip
    p.add_argument(
        "--no-vision", "--language-model-only", dest="no_vision", action="store_true",
        help="plan text-only serving: the vision tower of a multimodal model neither loaded nor planned "
        "(as serve/generate --language-model-only); by default its weights and one image's encoder "
        "activations are planned",
    )  # fmt: skip
    p.add_argument(
        "--tensor-parallel-size", "-tp", metavar="N", type=_positive_int, default=1,
        help="also plan each of N GPUs of this kind serving the model together: weights, KV bytes per token "
        "and pools per GPU (plan/parallel.py; docs/parallel.md)",
    )  # fmt: skip
    p.add_argument(
        "--linear-copies", choices=("auto", "on", "off"), default="auto",
        help="the engine's BF16 copies of the attention and dense-MLP weights, held from the KV cache (as `serve "
        "--linear-copies`; auto: on where they take <= 5%% of the card)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the same numbers as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = build_plan(
        args.model,
        gpu=args.gpu,
        gpu_memory=args.gpu_memory,
        bandwidth=args.bandwidth,
        kv_dtype=args.kv_dtype,
        context=args.context,
        concurrency=args.concurrency,
        recipe=args.recipe,
        mem_fraction_static=args.mem_fraction_static,
        swa_full_tokens_ratio=args.swa_full_tokens_ratio,
        prefill_chunk=args.prefill_chunk,
        preload_used=args.preload_used,
        sglang_weights=args.sglang_weights,
        k_eq_v_once=not args.k_and_v,
        vision=not args.no_vision,
        linear_copies="off" if args.tensor_parallel_size > 1 else args.linear_copies,
    )
    if args.tensor_parallel_size > 1:
        from nvfp4kit.plan.parallel import format_parallel, parallel_plan
        from nvfp4kit.plan.pools import default_sliding_chunk

        plan["tensor_parallel"] = parallel_plan(
            args.model, args.tensor_parallel_size, free_bytes=plan["gpu"]["free_bytes"], kv_dtype=args.kv_dtype,
            recipe=args.recipe, prefill_chunk=plan["nvfp4kit"]["prefill_chunk"], context=args.context,
            sliding_limit=default_sliding_chunk(plan["gpu"]["memory_bytes"]),
        )  # fmt: skip
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    if args.tensor_parallel_size > 1 and not args.json:
        print(format_parallel(plan["tensor_parallel"]))
    return 0
