"""FP8 row-scaled weights (the optional lm_head copy) and the W8A16 kernel against its reference."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.formats.fp8_rows import quantize_fp8_rows
from nvfp4kit.kernels.w8a16_linear import w8a16_linear


def test_fp8_rows_keep_each_row_within_e4m3_rounding():
    w = torch.randn(300, 96) * torch.logspace(-3, 2, 300)[:, None]  # rows of very different scales
    q = quantize_fp8_rows(w, rows_per_chunk=64)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (300,)
    back = q.dequantize()
    row_max = w.abs().amax(dim=1, keepdim=True)
    # 3 mantissa bits: half an ulp is 1/16 relative for normals; tiny values sit in the subnormal spacing
    assert ((back - w).abs() <= w.abs() / 16 + row_max / 448 * 2**-9 + 1e-12).all()
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)  # row maxima map to 448


@pytest.mark.parametrize("m", [1, 2, 3, 17])  # GEMV for one row, tensor-core tiles above
@pytest.mark.parametrize("n,k", [(37, 48), (130, 80)])
def test_w8a16_kernel_equals_dequantized_matmul(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    weight = quantize_fp8_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    expected = x @ weight.dequantize().T
    out = w8a16_linear(x, weight)
    assert out.shape == (m, n)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert w8a16_linear(x[:0], weight).shape == (0, n)


def test_fp8_lm_head_changes_logits_a_little_and_the_kernel_matches_the_torch_path(tiny_checkpoint):
    from nvfp4kit.kernels.backend import TritonBackend
    from nvfp4kit.model.loader import load_model
    from nvfp4kit.model.ops import TorchBackend

    model = load_model(tiny_checkpoint("moe"))
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    exact = model.logits(hidden)
    model.use_fp8_lm_head()
    assert model.lm_head_fp8.dtype == torch.float8_e4m3fn and "lm_head_fp8" not in model.state_dict()
    approx = model.logits(hidden)
    error = float((approx - exact).abs().max() / exact.abs().max())
    assert 0 < error < 0.05
    model.set_backend(TritonBackend())  # the W8A16 kernel (interpreted) instead of dequantize + matmul
    assert torch.allclose(model.logits(hidden), approx, rtol=1e-5, atol=1e-5)
    model.set_backend(TorchBackend())
    model.use_fp8_lm_head(False)
    assert torch.equal(model.logits(hidden), exact)
