"""All experts of a layer re-quantized in one batch (calib_experts): each expert gets exactly what it gets
alone, an expert without calibration tokens gets valid weight-error scales, and the batched statistics of the
calibration forward equal the per-expert sums."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.formats.nvfp4 import E4M3_MAX, SCALE_MIN
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.quant import calib_experts, calib_layer, quantize
from nvfp4kit.quant.calib_experts import refine_experts, shrink_few_tokens
from nvfp4kit.quant.calib_hessian import HessianBackend
from nvfp4kit.quant.calib_methods import calibration_method
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.quant.calib_search import quantize_group_searched

E, H, INTER = 5, 64, 32


def expert_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * INTER, H, generator=gen) * H**-0.5
    down = torch.randn(E, H, INTER, generator=gen) * INTER**-0.5
    gate_up[..., 3] *= 20.0  # an outlier input channel, as real experts have
    return gate_up, down


def statistics(tokens: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(H, H, generator=gen) * 0.3 + torch.eye(H)
    h_gu, h_dn = torch.zeros(E, H, H), torch.zeros(E, INTER, INTER)
    for e, t in enumerate(tokens):
        x = torch.randn(t, H, generator=gen) @ mix
        a = torch.randn(t, INTER, generator=gen)
        h_gu[e], h_dn[e] = x.T @ x, a.T @ a
    return h_gu, h_dn, torch.tensor(tokens)


def same(a, b) -> bool:
    return (
        torch.equal(a.packed, b.packed)
        and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
        and torch.equal(a.scale_2, b.scale_2)
    )


@pytest.mark.parametrize("method", ["gptq", "mse-output", "mse"])
def test_batched_experts_equal_one_by_one(method):
    quantizer = calibration_method(method).quantize_group
    gate_up, down = expert_weights()
    tokens = [400, 90, 40, 0, 250]  # plenty, more than K for down only, few, none, plenty
    data = method != "mse"

    def stats(sl):
        if not data:
            return dict(hessian_gate_up=None, hessian_down=None, tokens=None)
        h_gu, h_dn, t = statistics(tokens)
        return dict(hessian_gate_up=h_gu[sl], hessian_down=h_dn[sl], tokens=t[sl])

    batched = refine_experts(quantizer, gate_up, down, **stats(slice(None)))
    for e in range(E):
        alone = refine_experts(quantizer, gate_up[e : e + 1], down[e : e + 1], **stats(slice(e, e + 1)))
        for together, single in zip(batched, alone):
            assert same(together.expert(e), single.expert(0)), (method, e)


def test_experts_in_several_batches_equal_one_batch(monkeypatch):
    quantizer = calibration_method("gptq").quantize_group
    gate_up, down = expert_weights(seed=2)
    h_gu, h_dn, tokens = statistics([200, 100, 300, 80, 150])
    stats = dict(hessian_gate_up=h_gu, hessian_down=h_dn, tokens=tokens)
    one = refine_experts(quantizer, gate_up, down, **{k: v.clone() for k, v in stats.items()})
    monkeypatch.setattr(calib_experts, "EXPERT_BATCH", 2 * H * H)  # batches of 2, 2 and 1 experts
    several = refine_experts(quantizer, gate_up, down, **stats)
    assert all(same(a, b) for a, b in zip(one, several))


def test_expert_without_tokens_gets_weight_error_scales():
    gate_up, down = expert_weights(seed=3)
    h_gu, h_dn, tokens = statistics([300, 0, 300, 300, 300])
    gate, up, dn = refine_experts(
        calibration_method("gptq").quantize_group, gate_up, down,
        hessian_gate_up=h_gu, hessian_down=h_dn, tokens=tokens,
    )  # fmt: skip
    for q in (gate, up, dn):
        scale = q.scale[1].float()
        assert torch.isfinite(scale).all() and (scale >= SCALE_MIN).all() and (scale <= E4M3_MAX).all()
        assert torch.isfinite(q.scale_2[1]) and q.scale_2[1] > 0
    # expert 1 (no tokens) is quantized on weight error alone (H = I): searched scales, round to nearest
    eye_gu, eye_dn = torch.eye(gate_up.shape[-1]), torch.eye(down.shape[-1])
    mse_gate, mse_up = quantize_group_searched([gate_up[1, :INTER], gate_up[1, INTER:]], hessian=eye_gu)
    (mse_down,) = quantize_group_searched([down[1]], hessian=eye_dn)
    assert same(gate.expert(1), mse_gate) and same(up.expert(1), mse_up) and same(dn.expert(1), mse_down)
    error = (dn.expert(1).dequantize() - down[1]).norm() / down[1].norm()
    assert error < 0.12  # an NVFP4 round trip, not garbage


def test_few_tokens_shrink_towards_identity():
    h = torch.stack([torch.eye(8) * 4.0, torch.eye(8) * 4.0, torch.zeros(8, 8)])
    shrink_few_tokens(h, torch.tensor([20, 2, 0]))
    assert torch.equal(h[0], torch.eye(8) * 4.0)  # t >= K: untouched
    assert torch.allclose(h[1], torch.eye(8) * (4.0 + 0.75 * 4.0))  # t = K/4: (1 - t/K) mean(diag) added
    assert torch.equal(h[2], torch.eye(8))  # no tokens: weight error


def test_moe_statistics_sum_each_experts_routed_tokens():
    gen = torch.Generator().manual_seed(0)
    tokens, top_k = 40, 2
    x = torch.randn(tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:top_k] for _ in range(tokens)])  # E-1: unused
    weights = torch.rand(tokens, top_k, generator=gen)
    gate_up, down = expert_weights()
    backend = HessianBackend(norm_aware=False)
    backend.watch_experts(gate_up, "experts")
    out = backend.moe(x, ids, weights, gate_up, down)
    reference = HessianBackend(norm_aware=False)  # not watching: the plain torch MoE
    assert torch.allclose(out, reference.moe(x, ids, weights, gate_up, down), atol=1e-6)
    stats = backend.hessians
    assert torch.equal(stats["experts.tokens"], torch.bincount(ids.flatten(), minlength=E))
    for e in range(E):
        rows = (ids == e).any(-1)
        assert torch.allclose(stats["experts.gate_up"][e], x[rows].T @ x[rows], atol=1e-4)
    assert not stats["experts.gate_up"][E - 1].any() and not stats["experts.down"][E - 1].any()


def test_tiny_checkpoint_batched_equals_expert_by_expert(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch
):
    """The whole refine pass on the tiny MoE checkpoint (gptq, asymmetric): all experts in one batch or one
    expert at a time write the same bytes."""
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(
        method="gptq", calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False
    )
    batched = refine_checkpoint(src, base, tmp_path / "batched", **args)
    monkeypatch.setattr(calib_experts, "experts_per_batch", lambda *a, **k: 1)
    monkeypatch.setattr(calib_layer, "experts_per_batch", lambda *a, **k: 1)  # the asymmetric correction
    alone = refine_checkpoint(src, base, tmp_path / "alone", **args)
    ours, theirs = CheckpointReader(batched), CheckpointReader(alone)
    assert ours.names() == theirs.names()
    for name in ours.names():
        a, b = ours.get(name), theirs.get(name)
        assert (
            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            if a.dtype == torch.float8_e4m3fn
            else (torch.equal(a, b))
        ), name


def test_tiny_checkpoint_experts_without_tokens(bf16_checkpoint, calib_file, tmp_path, monkeypatch):
    """Three 6-token samples: 36 routed pairs over 8 experts x 6 layers leave experts without tokens; they
    still get valid scales."""
    src = bf16_checkpoint("moe")
    kwargs = dict(calib_data=[calib_file], num_samples=3, seq_len=6, progress=False)
    base = quantize(src, tmp_path / "max", calib_dtype=torch.float32, **kwargs).output
    routed = []
    original = HessianBackend.moe

    def moe(self, x, topk_ids, *rest):
        routed.append(torch.bincount(topk_ids.flatten(), minlength=8))
        return original(self, x, topk_ids, *rest)

    monkeypatch.setattr(HessianBackend, "moe", moe)
    out = refine_checkpoint(src, base, tmp_path / "gptq", method="gptq", **kwargs)
    assert any((t == 0).any() for t in routed), "some expert must see no token"
    reader = CheckpointReader(out)
    for name in reader.names():
        if ".experts." in name and name.endswith("weight_scale"):
            scale = reader.get(name).float()
            assert torch.isfinite(scale).all() and (scale >= SCALE_MIN).all(), name
        elif ".experts." in name and name.endswith("weight_scale_2"):
            assert torch.isfinite(reader.get(name)) and reader.get(name) > 0, name
