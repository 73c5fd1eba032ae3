"""The router in one launch (kernels/router.py `fused_route`) against the two-step path and the torch reference.

The two-step path is the projection through the backend's linear, then the `route` kernel; the fused kernel must
pick exactly its experts (ties to the lower expert id) and give its weights up to fp32 rounding. Shapes are
awkward on purpose: hidden sizes that are not a multiple of the K tile, expert counts that are not a multiple of
the experts per program, token counts over one token tile.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.kernels import router
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.model.ops import TorchBackend

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, random_weight, rel_error

TRITON, TORCH = TritonBackend(), TorchBackend()


def _inputs(
    t: int, e: int, h: int, *, seed: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None
):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(t, h, generator=gen) * 0.5).to(dtype)
    w = torch.randn(e, h, generator=gen).to(weight_dtype or dtype)
    scale = torch.rand(e, generator=gen) + 0.5
    return z.to(DEVICE), w.to(DEVICE), scale.to(DEVICE)


def _two_step(z, w, scale, top_k):
    return router.route(TRITON.linear(z, w), scale, top_k=top_k)


@pytest.mark.parametrize(
    "t,e,h,top_k,per_program",
    [(1, 8, 64, 2, None), (3, 6, 40, 3, 4), (17, 12, 72, 4, 2), (2, 5, 16, 5, 1), (1, 128, 176, 8, None)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_route_matches_the_two_step_path(t, e, h, top_k, per_program, dtype):
    z, w, scale = _inputs(t, e, h, seed=t * 100 + e, dtype=dtype)
    weights, ids = router.fused_route(z, w, scale, top_k=top_k, experts_per_program=per_program)
    ref_weights, ref_ids = _two_step(z, w, scale, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (t, top_k)
    assert torch.equal(ids, ref_ids)
    # bf16: the CPU's bf16 GEMM may round a logit one bf16 step away from an fp32 sum rounded once
    assert rel_error(weights, ref_weights) < (FP32_BOUND if dtype == torch.float32 else BF16_BOUND)
    once = router.route((z.float() @ w.float().T).to(dtype), scale, top_k=top_k)  # fp32 sums, one rounding
    assert torch.equal(ids, once[1])
    assert rel_error(weights, once[0]) < FP32_BOUND
    if dtype == torch.float32:  # no bf16 ties among the logits: torch.topk agrees too
        torch_weights, torch_ids = TORCH.route_tokens(z, w, scale, top_k=top_k)
        assert torch.equal(ids, torch_ids)
        assert rel_error(weights, torch_weights) < FP32_BOUND


def test_fused_route_rounds_a_wider_weight_as_the_linear_does():
    # an fp32 weight with bf16 activations: the unfused linear casts the weight to bf16 first
    z, w, scale = _inputs(3, 16, 48, seed=5, dtype=torch.bfloat16, weight_dtype=torch.float32)
    weights, ids = router.fused_route(z, w, scale, top_k=4)
    ref_weights, ref_ids = router.route((z.float() @ w.bfloat16().float().T).bfloat16(), scale, top_k=4)
    assert torch.equal(ids, ref_ids)
    assert rel_error(weights, ref_weights) < FP32_BOUND
    assert torch.equal(ids, _two_step(z, w, scale, 4)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_and_near_ties_pick_the_same_experts(dtype):
    # small integers: every logit is exact in any summation order and in bf16, so equal rows tie exactly
    gen = torch.Generator().manual_seed(3)
    e, h, top_k = 12, 24, 4
    w = torch.randint(-3, 4, (e, h), generator=gen).float()
    w[[4, 7, 9]] = w[2].clone()  # experts 2, 4, 7, 9 always tie
    w[5] = w[2].clone()
    w[5, 0] += 1  # expert 5 is one step from them
    z = torch.randint(-2, 3, (5, h), generator=gen).float()
    z[:, 0] = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0])  # ... which is a tie too where z[:, 0] = 0
    z[3] = 0.0  # every logit equal: the lowest ids win
    z, w, scale = z.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), torch.ones(e, device=DEVICE)
    weights, ids = router.fused_route(z, w, scale, top_k=top_k)
    ref_weights, ref_ids = _two_step(z, w, scale, top_k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(weights, ref_weights)  # exact logits: the same softmax to the bit
    probs = torch.softmax((z.float() @ w.float().T).cpu(), dim=-1)
    expected = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(ids.cpu(), expected)
    assert ids[3].tolist() == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NaN arithmetic
def test_garbage_rows_still_pick_valid_distinct_experts():
    z = torch.full((2, 32), float("nan"), device=DEVICE)
    w = torch.randn(6, 32, device=DEVICE)
    _, ids = router.fused_route(z, w, torch.ones(6, device=DEVICE), top_k=4)
    assert ((ids >= 0) & (ids < 6)).all()
    assert all(len(set(row)) == 4 for row in ids.tolist())


def test_decode_router_is_one_launch_and_leaves_its_counters_at_zero(kernel_names, monkeypatch):
    def no_gemv(*args, **kwargs):
        raise AssertionError("the fused router must not call the linear")

    z, w, scale = _inputs(1, 16, 64, seed=9, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.nn.functional, "linear", no_gemv)
    first = TRITON.route_tokens(z, w, scale, top_k=4)
    second = TRITON.route_tokens(z, w, scale, top_k=4)  # counters reset: the same answer again
    assert kernel_names == ["_fused_route_kernel"] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not arrival_counters(z.device, 1)[:8].any()


def test_quantized_weights_and_large_batches_keep_the_two_step_path(kernel_names, monkeypatch):
    nvfp4 = random_weight(8, 64, seed=1)
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    scale = torch.ones(8, device=DEVICE)
    weights, ids = TRITON.route_tokens(z, nvfp4, scale, top_k=2)
    ref_weights, ref_ids = TORCH.route_tokens(z, nvfp4, scale, top_k=2)
    assert torch.equal(ids, ref_ids)
    assert rel_error(weights, ref_weights) < FP32_BOUND
    assert "_fused_route_kernel" not in kernel_names and kernel_names[-1] == "_route_kernel"

    kernel_names.clear()
    monkeypatch.setattr(router, "FUSED_ROUTE_MAX_TOKENS", 2)
    z, w, scale = _inputs(3, 8, 32, seed=4, dtype=torch.float32)
    weights, ids = TRITON.route_tokens(z, w, scale, top_k=2)
    assert kernel_names == ["_route_kernel"]  # the projection went to torch (cuBLAS on a GPU)
    assert torch.equal(ids, TORCH.route_tokens(z, w, scale, top_k=2)[1])


def test_empty_batch_and_bad_shapes():
    w, scale = torch.randn(8, 32, device=DEVICE), torch.ones(8, device=DEVICE)
    weights, ids = router.fused_route(torch.empty(0, 32, device=DEVICE), w, scale, top_k=2)
    assert weights.shape == ids.shape == (0, 2)
    with pytest.raises(ValueError, match="weight \\[E, H\\]"):
        router.fused_route(torch.zeros(1, 16, device=DEVICE), w, scale, top_k=2)
    with pytest.raises(ValueError, match="top_k=9"):
        router.fused_route(torch.zeros(1, 32, device=DEVICE), w, scale, top_k=9)
    with pytest.raises(ValueError, match="per_expert_scale has 4 entries"):
        router.fused_route(torch.zeros(1, 32, device=DEVICE), w, scale[:4], top_k=2)
