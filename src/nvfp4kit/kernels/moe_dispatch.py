"""Which MoE kernels run for a step: the fragment kernels, the expert-grouped fragment kernels, grouped GEMMs for
prefill, or the Triton tiles of `fused_moe.py`, from the token count, the card, the operands and the card's tuned
table (`MoEConfig.path`)."""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import MoEConfig, select_moe_config
from nvfp4kit.kernels.moe_frag import frag_experts_supported, moe_frag_supported
from nvfp4kit.kernels.moe_prefill import grouped_mm_available
from nvfp4kit.kernels.path_limits import FRAG_TOKENS, GROUPED_ALONE_TOKENS, MOE_GROUPED_TOKENS
from nvfp4kit.kernels.thresholds import MOE_PREFILL_MIN_TOKENS


def moe_path(
    x2: torch.Tensor,
    top_k: int,
    gate_up: torch.Tensor | NVFP4Tensor,
    down: torch.Tensor | NVFP4Tensor,
    prefill_min_tokens: int = MOE_PREFILL_MIN_TOKENS,
    config: MoEConfig | None = None,
) -> str:
    """Which kernels `fused_moe` runs for tokens x2 [T, H]: "frag" (moe_frag.py, a program per token-expert
    pair), "grouped" (moe_frag_grouped.py, experts read once for their tokens), "prefill" (grouped GEMMs,
    moe_prefill.py) or "tiles" (the tuned or heuristic Triton tiles of fused_moe.py).

    An explicit `config` runs its own path (tiles where that one cannot run). Without one, below
    `prefill_min_tokens` the card's tuned table decides where its entry names a path (`nvfp4kit tune` timed the
    fragment kernels against the tiles on this card); otherwise the token limits do."""
    tokens = x2.shape[0]
    if config is not None:
        return _runnable(config.path, x2, top_k, gate_up, down) or "tiles"
    nvfp4 = isinstance(gate_up, NVFP4Tensor)
    if nvfp4 and tokens < prefill_min_tokens:
        num_experts, two_inter, hidden = gate_up.shape
        tuned = select_moe_config(tokens, num_experts, top_k, hidden, two_inter // 2, device=x2.device).path
        chosen = _runnable(tuned, x2, top_k, gate_up, down)
        if chosen is not None:
            return chosen
    if tokens <= FRAG_TOKENS and moe_frag_supported(x2, gate_up, down, top_k):
        return "frag"
    if 0 < FRAG_TOKENS and tokens <= MOE_GROUPED_TOKENS and frag_experts_supported(x2, gate_up, down):
        return "grouped"
    if nvfp4 and tokens >= max(1, prefill_min_tokens) and grouped_mm_available(x2):
        return "prefill"
    return "tiles"


def _runnable(path: str | None, x2: torch.Tensor, top_k: int, gate_up: object, down: object) -> str | None:
    """`path` if its kernels take these operands, else None. NVFP4KIT_FRAG_GEMV=0 turns the fragment kernels
    off whatever a table says."""
    if path == "tiles":
        return path
    if path == "frag" and FRAG_TOKENS > 0 and moe_frag_supported(x2, gate_up, down, top_k):
        return path
    if path == "grouped" and FRAG_TOKENS > 0 and frag_experts_supported(x2, gate_up, down):
        return path
    return None


def moe_shares_gpu(x2: torch.Tensor, top_k: int, gate_up: object, down: object) -> bool:
    """Whether the MoE of these tokens leaves room for the dense MLP on a second stream: not the expert-grouped
    kernels above `GROUPED_ALONE_TOKENS` tokens, whose programs fill the card (session 22, path_limits.py)."""
    return x2.shape[0] <= GROUPED_ALONE_TOKENS or moe_path(x2, top_k, gate_up, down) != "grouped"
