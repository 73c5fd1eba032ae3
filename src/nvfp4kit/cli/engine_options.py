"""Engine flags shared by `nvfp4kit serve` and `nvfp4kit generate` (named as vLLM's), and the LLM arguments
they turn into."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvfp4kit.plan.pools import DEFAULT_GPU_MEMORY_UTILIZATION
from nvfp4kit.plan.units import parse_size, token_counts

KV_CACHE_DTYPES = ("auto", "bf16", "fp8_e4m3", "fp8_e5m2", "float32")
ATTENTION_BACKENDS = ("triton", "torch")  # engine/attention_backend.py


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _size(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_size(text, option=option)
        except ValueError as exc:  # argparse already names the flag
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option}: ")) from None

    return parse


def add_engine_arguments(parser: argparse.ArgumentParser, *, max_num_seqs: int = 16) -> None:
    """Context, batching, KV-cache and memory flags of the engine."""
    g = parser.add_argument_group("engine and memory")
    g.add_argument(
        "--max-model-len", type=_positive_int, default=None, metavar="N",
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )  # fmt: skip
    g.add_argument(
        "--max-num-seqs", type=_positive_int, default=max_num_seqs, metavar="N",
        help=f"requests batched together at most; each holds a sliding-window ring (default {max_num_seqs})",
    )  # fmt: skip
    g.add_argument(
        "--max-num-batched-tokens", type=_positive_int, default=None, metavar="N",
        help="tokens per engine step, prefill chunks included (default, as vLLM's server: 8192 on GPUs with "
        "70+ GiB, 2048 on smaller GPUs, 512 on the CPU)",
    )  # fmt: skip
    g.add_argument(
        "--sliding-chunk", type=_positive_int, default=None, metavar="N",
        help="most tokens of a sequence one sliding-window attention pass takes; each running sequence keeps a "
        "ring of window + N tokens per sliding layer, and longer prefill chunks attend those layers in passes "
        "(default: --max-num-batched-tokens, at most 2048 on GPUs with 70+ GiB, 512 on smaller ones)",
    )  # fmt: skip
    g.add_argument(
        "--admission-delay", type=_non_negative_int, default=None, metavar="STEPS",
        help="steps a prompt that arrives while 32+ requests run may wait for more prompts to share its prefill "
        "step (such a step costs about the same for one prompt or several), unless --admission-tokens already "
        "wait; 0 admits at once (default 48 on CUDA, 0 on the CPU)",
    )  # fmt: skip
    g.add_argument(
        "--admission-tokens", type=_positive_int, default=None, metavar="N",
        help="prompt tokens waiting that end --admission-delay's wait at once (default "
        "--max-num-batched-tokens: a full prefill step)",
    )  # fmt: skip
    g.add_argument(
        "--prefill-graphs", type=token_counts, default=None, metavar="N,N,...",
        help="capture the steps that prefill in CUDA graphs for these token counts (e.g. 512,1024,2048): a step "
        "of up to N tokens replays the smallest graph that holds it instead of launching ~700 kernels from Python "
        "(on an H200 a 600-token prompt's step: 26 ms replayed, 52 eager); the memory plan reserves their pool. "
        "'none' turns them off (default: every multiple of 256 up to 2048 on GPUs with 70+ GiB, none on smaller ones)",
    )  # fmt: skip
    g.add_argument(
        "--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
        help="KV cache element type (default auto: the model's compute dtype; fp8_e5m2/fp8_e4m3 halve it)",
    )  # fmt: skip
    limit = g.add_mutually_exclusive_group()
    limit.add_argument(
        "--gpu-memory-utilization", type=_fraction, default=None, metavar="F",
        help=f"fraction of the GPU's total memory the engine may use, weights, reserve and KV cache "
        f"included (default {DEFAULT_GPU_MEMORY_UTILIZATION})",
    )  # fmt: skip
    limit.add_argument(
        "--gpu-memory-budget", type=_size("--gpu-memory-budget"), default=None, metavar="SIZE",
        help="behave as if the GPU had SIZE of memory, e.g. 24GiB, 22.5GB, 24G or 1.5e9 (a shared card, or "
        "a 24 GB card emulated on a larger one); replaces --gpu-memory-utilization",
    )  # fmt: skip
    g.add_argument(
        "--kv-cache-memory", type=_size("--kv-cache-memory"), default=None, metavar="SIZE",
        help="bytes for the KV cache itself (e.g. 8GiB), instead of what the memory limit leaves",
    )  # fmt: skip
    g.add_argument(
        "--enforce-eager", action="store_true",
        help="run decode steps eagerly instead of replaying CUDA graphs (less memory, slower)",
    )  # fmt: skip
    g.add_argument(
        "--no-overlap-schedule", dest="overlap_schedule", action="store_false",
        help="wait for each decode step's tokens before scheduling the next (default on CUDA: the next decode "
        "step is launched from the tokens still on the GPU while the host emits the last ones)",
    )  # fmt: skip
    g.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        default=None,
        help="skip the start-up warm-up. By default on CUDA the engine first runs every kernel variant a step "
        "can reach on dummy tokens, so no request waits for a Triton compile (0.3-2 s that stall every running "
        "stream). It costs one eager forward per planned step (27 for the 26B-A4B shape at 2,048 tokens, 128 "
        "sequences, 16K context) plus, on a cold Triton cache, the compiles: 20.5 s on an H200 the first time, "
        "2.9 s from ~/.triton/cache after; the log line says what it took",
    )
    g.add_argument("--warmup", dest="warmup", action="store_true", help=argparse.SUPPRESS)  # the old opt-in
    g.add_argument(
        "--fp8-lm-head", action="store_true",
        help="logits from an FP8 copy of the output projection: half its bytes per decode step (a faster "
        "batch-1 decode) for a small change in the logits; off by default",
    )  # fmt: skip
    g.add_argument(
        "--linear-copies", choices=("auto", "on", "off"), default="auto",
        help="BF16 copies of the attention and dense-MLP weights (not the experts), read by cuBLAS at steps of "
        "48+ tokens where it beats the 4-bit kernels: faster large-batch decode and prefill for 3.3 GB on "
        "26B-A4B, taken from the KV cache. auto (default): on where the copies take <= 5%% of the card "
        "(80 GB cards), off on 24-48 GB cards, under tensor parallelism and on the CPU",
    )  # fmt: skip
    g.add_argument(
        "--attention-backend", choices=ATTENTION_BACKENDS, default=None,
        help="who runs KV writes and attention: the Triton kernels or the torch reference (default: "
        "$NVFP4KIT_ATTENTION_BACKEND, else triton on CUDA and torch on the CPU)",
    )  # fmt: skip
    g.add_argument(
        "--tensor-parallel-size", "-tp", type=_positive_int, default=1, metavar="N",
        help="split the model over N devices, one process each (heads, MLP columns, experts, vocab rows; "
        "see docs/parallel.md); default 1",
    )  # fmt: skip
    g.add_argument(
        "--tune", action="store_true",
        help="before loading, tune the W4A16 kernels for this model's shapes on this GPU where the tuning "
        "cache has no entry yet (a few minutes once per card; see `nvfp4kit tune`)",
    )  # fmt: skip
    g.add_argument(
        "--kernel-cache-dir", type=Path, default=None, metavar="DIR",
        help="where the kernels' tuning tables are read (and `--tune` writes them): the folder given to "
        "`nvfp4kit tune --cache-dir` (default: $NVFP4KIT_CACHE_DIR, else ~/.cache/nvfp4kit/kernels)",
    )  # fmt: skip
    g.add_argument(
        "--language-model-only", "--no-vision", dest="language_model_only", action="store_true",
        help="text only: a multimodal checkpoint's vision tower is neither loaded nor counted in the memory "
        "plan (about 1.2 GiB more KV cache for 26B-A4B); image requests are refused",
    )  # fmt: skip


def llm_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `LLM(...)` from the flags `add_engine_arguments` added."""
    from nvfp4kit.engine.engine import EngineConfig

    config = EngineConfig(
        kv_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        sliding_chunk=getattr(args, "sliding_chunk", None),
        admission_delay=getattr(args, "admission_delay", None),
        admission_tokens=getattr(args, "admission_tokens", None),
        prefill_graphs=getattr(args, "prefill_graphs", None),
        max_model_len=args.max_model_len,
        cuda_graphs=not args.enforce_eager,
        attention_backend=args.attention_backend,
        overlap_schedule=None if getattr(args, "overlap_schedule", True) else False,
        warmup=getattr(args, "warmup", None),
    )
    extra = {"language_model_only": True} if getattr(args, "language_model_only", False) else {}
    if getattr(args, "tensor_parallel_size", 1) > 1:
        extra["tensor_parallel_size"] = args.tensor_parallel_size
    return {
        **extra,
        "engine_config": config,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "gpu_memory_budget": args.gpu_memory_budget,
        "kv_cache_memory": args.kv_cache_memory,
        "fp8_lm_head": args.fp8_lm_head,
        "linear_copies": getattr(args, "linear_copies", "auto"),
        "tune": args.tune,
        "kernel_cache_dir": getattr(args, "kernel_cache_dir", None),
    }
