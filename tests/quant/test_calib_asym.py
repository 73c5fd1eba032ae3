"""Asymmetric calibration (calib_asym): each linear fitted to the full-precision model's outputs."""

from __future__ import annotations

import torch

from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.quant import calib_asym
from nvfp4kit.quant.calib_asym import corrected_weight
from nvfp4kit.quant.calib_refine import refine_checkpoint


def test_correction_vanishes_when_the_streams_agree_and_fits_them_when_not(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=gen)
    x_full = torch.randn(500, 32, generator=gen)
    h = x_full.T @ x_full
    assert torch.equal(corrected_weight(w, h, h.clone()), w)  # same inputs: W itself
    x_q = x_full + 0.05 * torch.randn(500, 32, generator=gen)  # inputs through quantized layers
    h_q, cross = x_q.T @ x_q, x_full.T @ x_q
    best = torch.linalg.lstsq(x_q, x_full @ w.T).solution.T  # argmin ||W x_full - W' x_q||
    half = corrected_weight(w, h_q, cross, damping=0.0)  # STRENGTH 0.5: half way from W to the fit
    assert torch.allclose(half, w + 0.5 * (best - w), atol=1e-3)
    monkeypatch.setattr(calib_asym, "STRENGTH", 1.0)
    assert torch.allclose(corrected_weight(w, h_q, cross, damping=0.0), best, atol=1e-3)
    error = lambda m: (x_full @ w.T - x_q @ m.T).norm()  # noqa: E731
    assert error(corrected_weight(w, h_q, cross)) < error(w)  # damped as GPTQ damps it: still closer
    batched = corrected_weight(w.expand(3, -1, -1), h_q.expand(3, -1, -1), cross.expand(3, -1, -1),
                               keep=torch.tensor([False, True, False]))  # fmt: skip
    assert torch.equal(batched[1], w) and torch.allclose(batched[0], corrected_weight(w, h_q, cross))


def test_tiny_checkpoint_asymmetric(bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path):
    """Layer 0's q/k/v see the same inputs in both streams, so they come out as without the twin; later
    linears differ."""
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(
        method="gptq", calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False
    )
    plain = CheckpointReader(refine_checkpoint(src, base, tmp_path / "plain", asymmetric=False, **args))
    asym = CheckpointReader(refine_checkpoint(src, base, tmp_path / "asym", asymmetric=True, **args))
    assert plain.names() == asym.names()
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert torch.equal(plain.get(name), asym.get(name)), name
    later = [n for n in plain.names() if n.startswith("model.layers.3.") and n.endswith(".weight_scale")]
    assert sum(not torch.equal(plain.get(n).float(), asym.get(n).float()) for n in later) > len(later) // 2
