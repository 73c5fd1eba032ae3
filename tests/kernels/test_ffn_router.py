"""A MoE layer's FFN inputs and router in one launch (kernels/ffn_router.py) against the two kernel_names it replaces.

The unfused path is `norms.ffn_inputs` then `router.fused_route` on the router input it stored; the fused kernel
must give the same h, normed inputs, expert ids and weights to the bit (its rows go through the same code, its
logits are summed in the same order). Shapes are awkward on purpose: hidden sizes that are not a power of two,
one to three K steps of the router's dot, expert counts that are not a power of two, token counts that leave
padding slots in a tile, more tokens than one tile.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.kernels import ffn_router, norms, router
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.ops import FusedRegions, TorchBackend
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny import tiny_text_config

from .helpers import DEVICE, FP32_BOUND, ON_GPU, random_weight, rel_error

TRITON, TORCH = TritonBackend(), TorchBackend()
EPS = 1e-6


def _inputs(
    t: int, h: int, e: int, *, seed: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None
):
    """(residual, attn_out, the layer's norm weights, router weight [E, H], per-expert scale) on the device."""
    gen = torch.Generator().manual_seed(seed)

    def norm_weight() -> torch.Tensor:
        return (1.0 + 0.2 * torch.randn(h, generator=gen)).to(dtype).to(DEVICE)

    residual = torch.randn(t, h, generator=gen).to(dtype).to(DEVICE)
    attn_out = (torch.randn(t, h, generator=gen) * 3).to(dtype).to(DEVICE)
    norm_weights = dict(post_attn_norm=norm_weight(), mlp_norm=norm_weight(), experts_norm=norm_weight())
    norm_weights["router_scale"] = norm_weight()
    weight = torch.randn(e, h, generator=gen).to(weight_dtype or dtype).to(DEVICE)
    scale = (torch.rand(e, generator=gen) + 0.5).to(DEVICE)
    return residual, attn_out, norm_weights, weight, scale


def _unfused(residual, attn_out, norm_weights, weight, scale, top_k, per_program=None):
    h, mlp_in, experts_in, router_in = norms.ffn_inputs(residual, attn_out, **norm_weights, eps=EPS)
    weights, ids = router.fused_route(router_in, weight, scale, top_k=top_k, experts_per_program=per_program)
    return h, mlp_in, experts_in, weights, ids


def _fused(residual, attn_out, norm_weights, weight, scale, top_k, per_program=None):
    return ffn_router.ffn_inputs_routed(
        residual, attn_out, **norm_weights, router_weight=weight, per_expert_scale=scale, top_k=top_k,
        eps=EPS, experts_per_program=per_program,
    )  # fmt: skip


def _assert_equal(got, want) -> None:
    names = ("h", "mlp_in", "experts_in", "weights", "ids")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "weights" and ON_GPU:
            close(a, b)
        else:
            assert torch.equal(a, b), f"{name} differs from the unfused path: {a} vs {b}"


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Routing weights: equal in the interpreter; on a GPU each kernel lays out the top-k's normalising sum and its
    division its own way: fp32 weights 3.3e-7 apart at most on the H100 (session 31; bf16 inputs were equal)."""
    torch.testing.assert_close(a, b, rtol=5e-7, atol=0.0)


@pytest.mark.parametrize(
    "t,h,e,top_k,per_program",
    [
        (1, 40, 8, 1, None),
        (2, 72, 12, 2, None),
        (3, 600, 8, 3, None),  # two K steps of the dot
        (4, 1100, 12, 4, None),  # three K steps and an empty fourth in the row block
        (3, 1100, 12, 12, 4),  # four experts a program, K steps of 256; top-12: every logit shows
        (6, 40, 8, 2, None),  # two token tiles, the second with padding slots
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_two_launches_to_the_bit(t, h, e, top_k, per_program, dtype):
    args = _inputs(t, h, e, seed=t * 1000 + h + e, dtype=dtype)
    got = _fused(*args, top_k, per_program)
    _assert_equal(got, _unfused(*args, top_k, per_program))
    assert got[4].shape == (t, top_k) and got[3].dtype == torch.float32 and got[4].dtype == torch.int64
    if dtype == torch.float32:  # the torch regions: the same math in fp32 (no near-ties among these logits)
        residual, attn_out, norm_weights, weight, scale = args
        ref = TORCH.ffn_inputs_routed(
            residual,
            attn_out,
            **norm_weights,
            router_weight=weight,
            per_expert_scale=scale,
            top_k=top_k,
            eps=EPS,
        )
        assert torch.equal(got[4], ref[4])
        for a, b in zip(got[:4], ref[:4]):
            assert rel_error(a, b) < FP32_BOUND


def test_a_wider_router_weight_is_rounded_as_the_two_launches_round_it():
    # bf16 activations, an fp32 weight: the unfused path casts the weight to bf16 before its dot
    args = _inputs(3, 72, 12, seed=11, dtype=torch.bfloat16, weight_dtype=torch.float32)
    _assert_equal(_fused(*args, 4), _unfused(*args, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_logits_go_to_the_lower_expert(dtype):
    residual, attn_out, norm_weights, weight, scale = _inputs(4, 72, 12, seed=5, dtype=dtype)
    weight[[4, 7, 9]] = weight[2].clone()  # experts 2, 4, 7, 9: the same logit for every token
    residual[1] = 0.0
    attn_out[1] = 0.0  # h = 0: every logit of token 1 is 0
    scale = torch.ones_like(scale)
    args = (residual, attn_out, norm_weights, weight, scale)
    got = _fused(*args, 5)
    _assert_equal(got, _unfused(*args, 5))
    assert got[4][1].tolist() == [0, 1, 2, 3, 4]
    close(got[3][1], torch.full((5,), 0.2, device=DEVICE))
    # the rest in the order of a stable sort of the probabilities of the (rounded) logits
    z = norms.ffn_inputs(residual, attn_out, **norm_weights, eps=EPS)[3]
    logits = (z.float() @ weight.float().T).to(dtype).float()
    expected = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(got[4].cpu(), expected.cpu())
    for row in got[4].tolist():
        ties = [i for i in row if i in (2, 4, 7, 9)]
        assert ties == sorted(ties)


def test_backend_takes_one_launch_at_decode_sizes_and_leaves_its_counters_at_zero(kernel_names):
    residual, attn_out, norm_weights, weight, scale = _inputs(2, 72, 8, seed=3, dtype=torch.bfloat16)
    kwargs = dict(norm_weights, router_weight=weight, per_expert_scale=scale, top_k=2, eps=EPS)
    first = TRITON.ffn_inputs_routed(residual, attn_out, **kwargs)
    second = TRITON.ffn_inputs_routed(residual, attn_out, **kwargs)  # counters reset: the same answer again
    assert kernel_names == ["_ffn_inputs_routed_kernel"] * 2
    _assert_equal(first, second)
    _assert_equal(first, _unfused(residual, attn_out, norm_weights, weight, scale, 2))
    assert not arrival_counters(residual.device, 1)[:8].any()


def test_backend_keeps_the_two_step_path_for_larger_batches_and_quantized_weights(kernel_names):
    residual, attn_out, norm_weights, weight, scale = _inputs(5, 64, 8, seed=4, dtype=torch.float32)
    kwargs = dict(norm_weights, per_expert_scale=scale, top_k=2, eps=EPS)
    got = TRITON.ffn_inputs_routed(residual, attn_out, router_weight=weight, **kwargs)
    assert kernel_names == [
        "_ffn_inputs_kernel",
        "_route_kernel",
    ]  # the projection went to torch (cuBLAS on a GPU)
    ref = TORCH.ffn_inputs_routed(residual, attn_out, router_weight=weight, **kwargs)
    assert torch.equal(got[4], ref[4])
    assert all(rel_error(a, b) < FP32_BOUND for a, b in zip(got[:4], ref[:4]))

    kernel_names.clear()
    nvfp4 = random_weight(8, 64, seed=1)
    got = TRITON.ffn_inputs_routed(residual[:2], attn_out[:2], router_weight=nvfp4, **kwargs)
    assert kernel_names[0] == "_ffn_inputs_kernel" and kernel_names[-1] == "_route_kernel"
    assert "_ffn_inputs_routed_kernel" not in kernel_names
    h, mlp_in, experts_in, router_in = norms.ffn_inputs(residual[:2], attn_out[:2], **norm_weights, eps=EPS)
    _assert_equal(got, (h, mlp_in, experts_in, *TRITON.route_tokens(router_in, nvfp4, scale, top_k=2)))


def test_both_backends_have_the_region():
    assert isinstance(TRITON, FusedRegions) and isinstance(TORCH, FusedRegions)


def test_empty_batch_and_bad_shapes():
    residual, attn_out, norm_weights, weight, scale = _inputs(2, 32, 8, seed=6, dtype=torch.float32)
    empty = _fused(residual[:0], attn_out[:0], norm_weights, weight, scale, 2)
    assert [tuple(x.shape) for x in empty] == [(0, 32)] * 3 + [(0, 2)] * 2
    with pytest.raises(ValueError, match="residual \\[T, H\\]"):
        _fused(residual[None], attn_out, norm_weights, weight, scale, 2)
    with pytest.raises(ValueError, match="router_weight must be \\[E, 32\\]"):
        _fused(residual, attn_out, norm_weights, weight[:, :16], scale, 2)
    with pytest.raises(ValueError, match="top_k=9"):
        _fused(residual, attn_out, norm_weights, weight, scale, 9)
    with pytest.raises(ValueError, match="attn_out has 1 rows"):
        _fused(residual, attn_out[:1], norm_weights, weight, scale, 2)


def test_tiny_moe_model_gives_the_same_logits_fused_and_unfused(monkeypatch, kernel_names):
    """A tiny MoE model (a sliding and a global layer) in bf16 on the triton backend, a 2-token prompt chunk then
    one token (both sizes the region fuses), with the region fused and as two kernel_names: the same logits to the
    bit."""
    cfg = config_from_dict(tiny_text_config("moe", num_hidden_layers=2))
    model = random_model(
        cfg, quantized=True, dtype=torch.bfloat16, device=DEVICE, backend=TritonBackend(), seed=3
    )
    tokens = torch.tensor([5, 17, 301], device=DEVICE)

    def logits() -> torch.Tensor:
        cache, rows = ContiguousKVCache(cfg), []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's exp of very negative numbers
            for chunk in (tokens[:2], tokens[2:3]):
                ctx = cache.step(chunk.numel(), device=DEVICE)
                rows.append(model(chunk, ctx))
                ctx.commit()
        return torch.cat(rows)

    fused = logits()
    assert kernel_names.count("_ffn_inputs_routed_kernel") == 2 * cfg.num_hidden_layers
    assert "_ffn_inputs_kernel" not in kernel_names and "_fused_route_kernel" not in kernel_names
    kernel_names.clear()
    monkeypatch.setattr(ffn_router, "fuses", lambda residual, weight: False)
    unfused = logits()
    assert "_ffn_inputs_routed_kernel" not in kernel_names and "_fused_route_kernel" in kernel_names
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, unfused)
