"""The layer objective weighted by the loss's gradients at the layer output (calib_fisher): what it weighs, the
gradients the backward pass keeps, and that zero gradients leave GPTQ's export exactly as it was."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_block, calib_fisher, calib_refine, calib_round
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_fisher import fisher_error
from nvfp4kit.quant.calib_guided import token_sensitivities
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.tokenizer import Tokenizer


def test_diagonal_and_projected_forms(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    out, target, g = (torch.randn(5, 8, generator=gen) for _ in range(3))
    e = out - target
    assert torch.allclose(fisher_error(out, target, g), (e.pow(2) * g.pow(2)).mean())
    assert fisher_error(out, target, torch.zeros_like(g)) == 0
    g[0, 0] = 1e3  # one weight of 1e6 is capped at CLIP
    assert torch.allclose(
        fisher_error(out, target, g), (e.pow(2) * g.pow(2).clamp(max=calib_fisher.CLIP)).mean()
    )
    monkeypatch.setattr(calib_fisher, "FORM", "projected")
    assert torch.allclose(fisher_error(out, target, g), (e * g).sum(-1).pow(2).mean())
    # an error orthogonal to the token's gradient costs nothing in the projected form
    along = torch.tensor([[1.0, 0.0]])
    assert fisher_error(torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2), along) == 0
    monkeypatch.setattr(calib_fisher, "FORM", "full")
    with pytest.raises(ValueError, match="FORM"):
        fisher_error(out, target, g)


def test_layer_gradients_come_from_the_same_pass(bf16_checkpoint, calib_file):
    """One [T, H] fp16 gradient per layer, scaled to a mean square of 1; the last layer's output at a window's
    last position predicts nothing, so its gradient there is exactly zero; the token weights are unchanged."""
    src = bf16_checkpoint("moe")
    samples = calibration_samples(Tokenizer(src), [calib_file], num_samples=3, seq_len=40)
    cfg = load_model(src).config
    kept: list[torch.Tensor] = []
    weights = token_sensitivities(src, samples, labels="data", chunk_tokens=80, layer_gradients=kept)
    assert len(kept) == cfg.num_hidden_layers
    tokens = sum(map(len, samples))
    for g in kept:
        assert g.shape == (tokens, cfg.hidden_size) and g.dtype == torch.float16
        assert abs(float(g.float().pow(2).mean()) - 1) < 1e-2
    ends = torch.tensor([len(s) for s in samples]).cumsum(0) - 1
    assert torch.all(kept[-1][ends] == 0) and kept[-1].abs().sum() > 0
    plain = token_sensitivities(src, samples, labels="data", chunk_tokens=80)
    assert all(torch.equal(weights[n], plain[n]) for n in plain)


def test_zero_gradients_leave_the_gptq_export_unchanged_and_the_layout_is_max(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch
):
    """With every layer-output gradient zero the weighted objective is zero: learned rounding and the block
    scales keep GPTQ's codes, scales and norms, tensor for tensor; with the real gradients they move, and the
    export keeps ModelOpt's names, shapes and dtypes and loads."""
    monkeypatch.setattr(calib_round, "STEPS", 16)
    monkeypatch.setattr(calib_block, "STEPS", 16)
    monkeypatch.setattr(calib_block, "LR", 5e-3)
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(method="gptq", calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False,
                loss_weights="sampled")  # fmt: skip
    gptq = CheckpointReader(refine_checkpoint(src, base, tmp_path / "gptq", **args))
    tuned_args = dict(learned_rounding=True, block_scales=True, layer_fisher=True, **args)
    real = token_sensitivities

    def zero_gradients(*a, layer_gradients=None, **k):
        out = real(*a, layer_gradients=layer_gradients, **k)
        for g in layer_gradients or []:
            g.zero_()
        return out

    monkeypatch.setattr(calib_refine, "token_sensitivities", zero_gradients)
    zero = CheckpointReader(refine_checkpoint(src, base, tmp_path / "zero", **tuned_args))
    assert zero.names() == gptq.names()
    for name in gptq.names():
        assert torch.equal(
            zero.get(name).reshape(-1).view(torch.uint8), gptq.get(name).reshape(-1).view(torch.uint8)
        ), name
    monkeypatch.setattr(calib_refine, "token_sensitivities", real)
    tuned = CheckpointReader(refine_checkpoint(src, base, tmp_path / "tuned", **tuned_args))
    export = CheckpointReader(base)
    assert tuned.names() == export.names()
    for name in export.names():
        a, b = export.get(name), tuned.get(name)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    codes = [n for n in tuned.names() if n.endswith(".weight") and tuned.get(n).dtype == torch.uint8]
    assert any(not torch.equal(tuned.get(n), gptq.get(n)) for n in codes)
    load_model(tmp_path / "tuned")
    with pytest.raises(ValueError, match="layer_fisher"):
        refine_checkpoint(src, base, tmp_path / "none", layer_fisher=True, **args)


def test_two_layer_window_runs_the_next_full_precision_layer(bf16_checkpoint, monkeypatch):
    """calib_window: `after` is layer i+1 of the BF16 model on whatever layer i outputs (windows as given), its
    targets that layer's outputs on the full-precision stream; the last layer keeps the one-layer objective."""
    from nvfp4kit.config import load_config
    from nvfp4kit.formats.safetensors_io import CheckpointReader as Reader
    from nvfp4kit.model.weight_sources import WeightSource
    from nvfp4kit.quant import calib_window
    from nvfp4kit.quant.calib_window import next_layer_window
    from nvfp4kit.quant.calibrate import CalibrationContext

    src = bf16_checkpoint("moe")
    cfg = load_config(src)
    source = WeightSource(Reader(src), cfg, dtype=torch.float32, device=torch.device("cpu"))
    lengths = [8, 8, 8]
    x = torch.randn(sum(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    assert next_layer_window(cfg, source, 0, x, None, lengths, torch.device("cpu")) is None  # LAYERS = 1
    monkeypatch.setattr(calib_window, "LAYERS", 2)
    after, targets = next_layer_window(cfg, source, 0, x, None, lengths, torch.device("cpu"))
    model = load_model(src, dtype=torch.float32)
    with torch.no_grad():
        expected = model.layers[1](x, CalibrationContext(cfg, lengths, chunk=0, kv_store={}, device=x.device))
        assert torch.allclose(targets, expected, atol=1e-5)
        rows = torch.arange(8, 24)
        assert torch.allclose(after(x[rows], [8, 8], rows), expected[rows], atol=1e-5)
    last = cfg.num_hidden_layers - 1
    assert next_layer_window(cfg, source, last, x, None, lengths, torch.device("cpu")) is None
