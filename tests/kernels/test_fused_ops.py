"""Fused element-wise regions (norms, qkv norm + RoPE, GeGLU, routing) against the torch backend on fp32 inputs.

Shapes are awkward on purpose: rows that are not powers of two, T = 0, 1, 3, 7, 17, tiny and real head sizes,
positions past 1e5 (RoPE angle reduction), experts not a power of two.
"""

import pytest
import torch

from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.ops import TorchBackend

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, rel_error

TRITON, TORCH = TritonBackend(), TorchBackend()
EPS = 1e-6


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _weight(n, seed):
    return 1.0 + 0.3 * _randn(n, seed=seed)


def _f32(*tensors):
    return [None if t is None else t.float() for t in tensors]


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    if ref.numel():
        assert rel_error(out, ref) < (FP32_BOUND if dtype == torch.float32 else BF16_BOUND)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(0, 80), (1, 80), (3, 176), (2, 2816), (7, 5376)])
def test_rms_norm(dtype, t, n):
    x = _randn(t, n, seed=t, dtype=dtype, scale=3.0)
    w = _weight(n, seed=n).to(dtype)
    _check(TRITON.rms_norm(x, w, eps=EPS), TORCH.rms_norm(*_f32(x, w), eps=EPS), dtype)
    _check(TRITON.rms_norm(x, None, eps=EPS), TORCH.rms_norm(x.float(), None, eps=EPS), dtype)


def test_rms_norm_of_strided_rows_and_leading_dims():
    x = _randn(3, 5, 2 * 48, seed=4)[..., 48:]  # rows with a stride of 96
    w = _weight(48, seed=5)
    _check(TRITON.rms_norm(x, w, eps=EPS), TORCH.rms_norm(x, w, eps=EPS), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,moe", [(0, 64, True), (1, 80, True), (3, 176, False), (17, 200, True),
                                     (5, 2816, True), (2, 1536, False)])  # fmt: skip
def test_ffn_inputs(dtype, t, n, moe):
    residual = _randn(t, n, seed=n, dtype=dtype, scale=10.0)
    attn_out = _randn(t, n, seed=n + 1, dtype=dtype, scale=0.5)
    norms = dict(
        post_attn_norm=_weight(n, seed=1).to(dtype),
        mlp_norm=_weight(n, seed=2).to(dtype),
        experts_norm=_weight(n, seed=3).to(dtype) if moe else None,
        router_scale=_weight(n, seed=4).to(dtype) if moe else None,
    )
    h, *normed = TRITON.ffn_inputs(residual, attn_out, **norms, eps=EPS)
    f32_norms = {k: _f32(v)[0] for k, v in norms.items()}
    ref_h, *_ = TORCH.ffn_inputs(*_f32(residual, attn_out), **f32_norms, eps=EPS)
    _check(h, ref_h, dtype)
    # the normed copies are of the residual as stored (rounded to dtype), as a separate launch would read it
    _, *refs = TORCH.ffn_inputs(h.float(), torch.zeros_like(ref_h), **f32_norms, eps=EPS)
    assert len(normed) == len(refs) == 3
    for out, ref in zip(normed, refs):
        if ref is None:
            assert out is None and not moe
        else:
            _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,experts,scalar,next_norm", [(0, 80, True, True, True), (1, 80, True, True, False),
                                                          (3, 176, False, True, True), (17, 200, True, True, True),
                                                          (4, 2816, True, False, False), (1, 1536, False, True, True)])  # fmt: skip
def test_ffn_tail(dtype, t, n, experts, scalar, next_norm):
    h, mlp_out = _randn(t, n, seed=1, dtype=dtype, scale=4.0), _randn(t, n, seed=2, dtype=dtype)
    experts_out = _randn(t, n, seed=3, dtype=dtype, scale=0.1) if experts else None
    norms = dict(
        post_norm=_weight(n, 4).to(dtype),
        post_mlp_norm=_weight(n, 5).to(dtype) if experts else None,
        post_experts_norm=_weight(n, 6).to(dtype) if experts else None,
        layer_scalar=torch.tensor([0.7], device=DEVICE).to(dtype) if scalar else None,
        next_norm=_weight(n, 7).to(dtype) if next_norm else None,
    )
    out, normed = TRITON.ffn_tail(h, mlp_out, experts_out, **norms, eps=EPS)
    f32_norms = {k: _f32(v)[0] for k, v in norms.items()}
    ref, _ = TORCH.ffn_tail(*_f32(h, mlp_out, experts_out), **f32_norms, eps=EPS)
    _check(out, ref, dtype)
    if not next_norm:
        assert normed is None
    else:  # the next layer's input norm of the residual as stored
        _check(normed, TORCH.rms_norm(out.float(), f32_norms["next_norm"], eps=EPS), dtype)


def _inv_freq(half, proportional):
    inv = 1.0 / (10_000.0 ** (torch.arange(half).float() / half))
    if proportional:  # rotate a quarter of the pairs, the rest pass through with frequency 0
        inv[half // 4 :] = 0.0
    return inv.to(DEVICE)


QKV_CASES = {  # heads, kv heads, head dim, computes K/V, has v_proj, proportional RoPE
    "tiny_sliding": (4, 2, 16, True, True, False),
    "tiny_k_eq_v": (4, 1, 32, True, False, True),
    "kv_shared": (4, 2, 16, False, False, False),
    "sliding_256": (2, 1, 256, True, True, False),
    "global_512_k_eq_v": (2, 1, 512, True, False, True),
    "odd_half_24": (3, 1, 24, True, True, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(QKV_CASES))
@pytest.mark.parametrize("t", [0, 3])
def test_qkv_norm_rope(dtype, case, t):
    heads, kv_heads, d, computes_kv, v_proj, proportional = QKV_CASES[case]
    width = heads * d + (kv_heads * d * (2 if v_proj else 1) if computes_kv else 0)
    qkv = _randn(t, width, seed=d, dtype=dtype, scale=2.0)
    positions = torch.tensor([0, 5, 131_071, 77, 100_003][:t], device=DEVICE)
    args = dict(
        positions=positions,
        inv_freq=_inv_freq(d // 2, proportional),
        q_norm=_weight(d, 1).to(dtype),
        k_norm=_weight(d, 2).to(dtype) if computes_kv else None,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=d,
        v_proj=v_proj,
        eps=EPS,
    )
    outs = TRITON.qkv_norm_rope(qkv, **args)
    refs = TORCH.qkv_norm_rope(
        qkv.float(), **{**args, "q_norm": args["q_norm"].float(), "k_norm": _f32(args["k_norm"])[0]}
    )
    for out, ref in zip(outs, refs):
        if ref is None:
            assert out is None
        else:
            _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(0, 48), (1, 48), (3, 704), (2, 2112)])
def test_geglu(dtype, t, inter):
    gate_up = _randn(t, 2 * inter, seed=inter, dtype=dtype, scale=3.0)
    gate_up[:, :3] = torch.tensor([-200.0, 0.0, 60.0], dtype=dtype)  # saturated tails and zero
    _check(TRITON.geglu(gate_up), TORCH.geglu(gate_up.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,experts,top_k", [(0, 8, 2), (1, 8, 2), (5, 6, 3), (3, 128, 8), (2, 5, 5)])
def test_route(dtype, t, experts, top_k):
    logits = _randn(t, experts, seed=experts, dtype=dtype, scale=2.0)
    scale = _weight(experts, 7).to(dtype)
    weights, ids = TRITON.route(logits, scale, top_k=top_k)
    ref_weights, ref_ids = TORCH.route(logits.float(), scale.float(), top_k=top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    if t:
        assert rel_error(weights, ref_weights) < FP32_BOUND


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf
def test_route_of_garbage_rows_still_picks_valid_distinct_experts():
    logits = torch.tensor([[float("nan")] * 6, [float("inf")] * 3 + [0.0] * 3], device=DEVICE)
    _, ids = TRITON.route(logits, torch.ones(6, device=DEVICE), top_k=4)
    assert ((ids >= 0) & (ids < 6)).all()
    assert all(len(set(row)) == 4 for row in ids.tolist())


def test_bad_shapes_are_named():
    x = _randn(2, 64, seed=0)
    with pytest.raises(ValueError, match="weight has 32 entries"):
        TRITON.rms_norm(x, torch.ones(32, device=DEVICE), eps=EPS)
    with pytest.raises(ValueError, match="top_k=9"):
        TRITON.route(_randn(2, 8, seed=1), torch.ones(8, device=DEVICE), top_k=9)
    with pytest.raises(ValueError, match="qkv has shape"):
        TRITON.qkv_norm_rope(x, positions=torch.arange(2, device=DEVICE), inv_freq=_inv_freq(8, False),
                             q_norm=torch.ones(16, device=DEVICE), k_norm=torch.ones(16, device=DEVICE),
                             num_heads=3, num_kv_heads=1, head_dim=16, v_proj=True, eps=EPS)  # fmt: skip
    with pytest.raises(ValueError, match="gate_up"):
        TRITON.geglu(_randn(2, 7, seed=2))
