"""Token counts at which a decode step's kernels switch paths: the fragment kernels, the expert-grouped MoE, and
when the grouped MoE runs alone (no Triton import). `NVFP4KIT_FRAG_GEMV` and `NVFP4KIT_MOE_GROUPED_TOKENS` are read
once, at import; a card's tuned table may name a path per token count over these limits (`moe_dispatch.moe_path`).
"""

from __future__ import annotations

import os

FRAG_MAX_TOKENS = 16  # gemv_mma.py: the MMA's 16 A rows
MOE_FRAG_MAX_TOKENS = 8  # moe_frag.py's kernels: the 1-8 token form


def token_limit(variable: str, raw: str, maximum: int) -> int:
    """A token-count switch from the environment: 0 / off, or a count up to `maximum`."""
    raw = raw.strip().lower()
    if raw in ("off", "false", "no"):
        return 0
    if not raw.isdigit() or int(raw) > maximum:
        raise ValueError(f"{variable} must be 0 (off) or a token count up to {maximum}, got {raw!r}")
    return int(raw)


# Up to this many tokens, NVFP4 linears, the dense MLP's gate_up + GeGLU and (up to 8) the MoE run the fragment
# kernels (gemv_mma.py, moe_frag.py) on SM80+ GPUs. On the H100 (session 19, docs/benchmarks.md): 1.04-1.5x
# faster than the tuned tiles at 1-8 tokens a linear, the engine's batch-1 / batch-4 decode +22% / +8%, batch 8
# even, most linears at 16 tokens 0.66-0.95x. NVFP4KIT_FRAG_GEMV: 0 turns every fragment kernel off.
FRAG_TOKENS = token_limit("NVFP4KIT_FRAG_GEMV", os.environ.get("NVFP4KIT_FRAG_GEMV", "4"), FRAG_MAX_TOKENS)
# Above FRAG_TOKENS and up to this many, the MoE runs expert-grouped fragment kernels (moe_frag_grouped.py). On
# the H100: the MoE layer 1.16 / 1.09 / 1.05x faster at 8 / 16 / 32 tokens, 0.96x at 64, 0.70x at 128; the
# engine's decode +7% at batch 8, +4% at 16 and 24, +3% at 32, -4% at 48 (with the limit at 64). Session 21, with
# two MMA tiles a row group above 16 tokens: the layer alone 1.06-1.12x at 64 tokens, 0.90-0.97x at 96, yet the
# engine's decode with the limit at 64 was 0.7-3% slower at batch 48 and 64. Session 22 found why: above 32
# tokens the grouped kernels fill the card, and the dense MLP beside them on a second stream (model/branches.py)
# slows both; with the MLP after the experts (GROUPED_ALONE_TOKENS) the limit at 64 gives 4,329 / 5,326-5,330 tok/s
# at batch 48 / 64 against 4,143-4,194 / 5,122-5,230 with 32 (H100, several runs); 96 tokens stay on the tiles.
# On the H200 too (session 22, one run, greedy tokens equal): 4,657 / 5,699 tok/s at batch 48 / 64 against
# 4,558 / 5,608 with the tiles and the MLP beside them.
MOE_GROUPED_TOKENS = token_limit(
    "NVFP4KIT_MOE_GROUPED_TOKENS", os.environ.get("NVFP4KIT_MOE_GROUPED_TOKENS", "64"), 1024
)
# above this many tokens the grouped MoE runs alone: no dense MLP beside it (at 32 tokens the overlap still wins,
# 3,311-3,321 tok/s against 3,209 at batch 32 on the H100)
GROUPED_ALONE_TOKENS = 32
