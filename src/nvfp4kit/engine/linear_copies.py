"""`--linear-copies`: BF16 copies of the NVFP4 linears outside the experts (attention, dense MLP, per-layer
projections), which cuBLAS reads at steps of many tokens (`kernels.thresholds.LINEAR_COPY_MIN_M` and up).

Why: from ~48 tokens a step the W4A16 Triton tiles fall behind BF16 cuBLAS on these shapes (0.45-0.81x at 64
tokens on an H200, 0.41-0.78x at 96 on an H100) while the experts, most of the bytes, are served well by the
grouped MoE kernels. Decode at large batches and prefill chunks therefore gain from copies of the small part of
the model that is not experts (3.1 GiB on the 26B-A4B shape, 22% of its weights; H100, session 32: batch 96
+5.9%, served concurrency 100 +4.6%). Smaller steps keep reading the 4-bit weights (the fragment GEMV and small
tiles match or beat cuBLAS there).

`auto`, the default, keeps them where they cost little: a CUDA card on which they take at most
`plan.weights.LINEAR_COPIES_MAX_SHARE` of the memory (80 GB and larger cards for 26B-A4B; never a 24 GB card,
whose memory the KV cache needs), one process (no tensor parallelism). A CPU keeps expanded copies of every
weight instead (`keep_cpu_copies`).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from nvfp4kit.model.layers import keep_dense_weights
from nvfp4kit.plan.weights import linear_copies_auto

log = logging.getLogger(__name__)

SETTINGS = ("auto", "on", "off")


def linear_copies_to_keep(
    setting: str | bool,
    *,
    device: torch.device | str,
    copy_bytes: int,
    model_dtype: torch.dtype = torch.bfloat16,
    tensor_parallel_size: int = 1,
    card_bytes: int | None = None,
) -> int:
    """The bytes of copies to keep and hold from the KV cache (0: none). `on` / `off` as given (`on` needs one
    CUDA process), `auto` by the rule in the module's docstring. `copy_bytes`: `plan.weights.linear_copy_bytes`
    or `plan.checkpoint.linear_copy_bytes_from_checkpoint`; a model loading in another dtype than bf16 keeps
    none (the W4A16 path reads bf16 copies only); `card_bytes`: the card `auto` sizes for
    (`--gpu-memory-budget`, which emulates a smaller card), else the device's own memory."""
    setting = {True: "on", False: "off"}.get(setting, setting)  # type: ignore[arg-type]
    if setting not in SETTINGS:
        raise ValueError(f"linear_copies must be one of {', '.join(SETTINGS)}, got {setting!r}")
    device = torch.device(device)
    if model_dtype != torch.bfloat16:
        copy_bytes = 0
    if setting == "on":
        if device.type != "cuda":
            raise ValueError(
                "--linear-copies on needs a CUDA device (a CPU keeps copies of every weight itself)"
            )
        if tensor_parallel_size > 1:
            raise ValueError("--linear-copies on is not supported with tensor parallelism")
        return copy_bytes
    if setting == "off" or device.type != "cuda" or tensor_parallel_size > 1:
        return 0
    if card_bytes is None:
        card_bytes = torch.cuda.get_device_properties(device).total_memory
    return copy_bytes if linear_copies_auto(copy_bytes, card_bytes) else 0


def keep_linear_copies(model: nn.Module) -> int:
    """Expand the model's non-expert NVFP4 linears into BF16 copies (before CUDA graphs are captured; the caller
    decides with `linear_copies_to_keep`); the bytes kept."""
    kept = keep_dense_weights(model, torch.bfloat16, limit_bytes=2**62, linears_only=True)
    log.info("BF16 copies of the attention and dense-MLP weights: %.2f GiB (--linear-copies)", kept / 2**30)
    return kept


def keep_cpu_copies(model: nn.Module) -> int:
    """On a CPU the torch backend would expand every NVFP4 weight on each call: keep expanded copies of all of
    them instead when they take at most a quarter of the machine's memory (and 8 GiB); the bytes kept."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): keep the small models' copies only
        ram = 4 * 2**30
    kept = keep_dense_weights(model, model.dtype, limit_bytes=min(8 * 2**30, ram // 4))
    log.debug("CPU: %.1f MiB of expanded weights kept", kept / 2**20)
    return kept
