"""Prefill-sized MoE (experts expanded into scratch, grouped GEMMs) against the torch reference backend.

The threshold is lowered per call (`prefill_min_tokens`) so tiny shapes run on the CPU: idle experts, one
expert that gets every token, a single token, intermediate sizes not a multiple of the expansion tiles.
"""

import warnings

import pytest
import torch

from nvfp4kit.kernels.fused_moe import fused_moe
from nvfp4kit.kernels.moe_prefill import grouped_mm_available
from nvfp4kit.model.ops import TorchBackend

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, random_experts, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU

E, H, INTER = 5, 144, 48  # 26B-A4B's H = 2816 and I = 704 keep K off the 128 tile too (144 = 9 x 16)


@pytest.fixture(scope="module")
def experts():
    return random_experts(E, 2 * INTER, H, seed=3), random_experts(E, H, INTER, seed=4)


def _run(x, ids, weights, gate_up, down, bound):
    if not grouped_mm_available(x):
        pytest.skip("torch._grouped_mm does not run this dtype on this device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's exp overflows for large gates
        out = fused_moe(x, ids, weights, gate_up, down, prefill_min_tokens=1)
    ref = TorchBackend().moe(x.float(), ids, weights.float(), gate_up, down)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < bound


def _routing(tokens, top_k, seed, *, idle=(), only=None):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen)
    for e in idle:
        logits[:, e] = -1e4
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    if only is not None:
        ids = torch.full_like(ids, only)
    return ids.to(DEVICE), (weights * 1.5).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,top_k,idle,only",
    [(37, 3, (0, 2), None), (1, 2, (), None), (19, 1, (), 4), (8, 2, (), 0)],
    ids=["idle_experts", "one_token", "all_to_last_expert", "all_to_first_expert"],
)
def test_grouped_moe_matches_reference(experts, dtype, tokens, top_k, idle, only):
    ids, weights = _routing(tokens, top_k, seed=tokens, idle=idle, only=only)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
    # bf16: the expanded weights, the GeGLU product and the output each round once
    _run(x, ids, weights, *experts, FP32_BOUND if dtype == torch.float32 else 2 * BF16_BOUND)


def test_below_threshold_and_dense_experts_keep_the_triton_path(experts, monkeypatch):
    import nvfp4kit.kernels.fused_moe as fused

    monkeypatch.setattr(fused, "moe_prefill", lambda *a, **kw: pytest.fail("grouped path taken"))
    ids, weights = _routing(6, 2, seed=1)
    x = torch.randn(6, H, device=DEVICE)
    fused_moe(x, ids, weights, *experts, prefill_min_tokens=7)
    dense = tuple(w.dequantize(torch.float32) for w in experts)
    fused_moe(x, ids, weights, *dense, prefill_min_tokens=1)


def test_empty_batch(experts):
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = fused_moe(torch.empty(0, H, device=DEVICE), ids, ids.float(), *experts, prefill_min_tokens=1)
    assert out.shape == (0, H)


def test_scratch_is_one_expert_block_as_the_memory_plan_reserves(experts):
    """The planner reserves E x I x H activation-dtype values for this path (plan/pools.expansion_scratch_bytes):
    gate, up and down reuse one block, so the scratch never holds all three."""
    from nvfp4kit.kernels.dequant import release_scratch, scratch_bytes

    ids, weights = _routing(9, 2, seed=9)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.bfloat16)
    release_scratch()
    _run(x, ids, weights, *experts, 2 * BF16_BOUND)
    assert scratch_bytes() == E * INTER * H * 2
