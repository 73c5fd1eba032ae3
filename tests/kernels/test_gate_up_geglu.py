"""The dense MLP's gate_up projection + GeGLU (`kernels/gate_up_geglu.py`): one launch where the fragment GEMV takes
the call (a GPU, bf16, 1-8 tokens), the projection then the GeGLU elsewhere, the same values either way.

Shapes carry the awkward traits of 26B-A4B's gate_up (2 x 2112 rows, K = 2816): an intermediate size that is not a
multiple of the row tile, K not a multiple of the K tile."""

import pytest
import torch

from nvfp4kit.kernels import gate_up_geglu as fused
from nvfp4kit.kernels.geglu import geglu
from nvfp4kit.kernels.w4a16_linear import w4a16_linear

from .helpers import BF16_BOUND, DEVICE, ON_GPU, random_weight, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)


@pytest.mark.parametrize("inter,k,tokens", [(44, 160, 1), (40, 256, 3), (8, 64, 8), (40, 96, 12)])
def test_gate_up_geglu_matches_gelu_of_the_projection(inter, k, tokens):
    weight = random_weight(2 * inter, k, seed=inter + k)
    x = torch.randn(tokens, k, device=DEVICE).to(torch.bfloat16 if ON_GPU else torch.float32)
    got = fused.gate_up_geglu(x, weight)
    assert got.shape == (tokens, inter) and got.dtype == x.dtype
    two = geglu(w4a16_linear(x, weight))
    if fused.frag_geglu_supported(x, weight):  # one launch: its own sum layout, rounded to bf16
        assert rel_error(got, two) < BF16_BOUND
    else:
        assert torch.equal(got, two)
    ref = x.float() @ weight.dequantize(torch.float32).T
    gate, up = ref.chunk(2, dim=-1)
    exact = torch.nn.functional.gelu(gate, approximate="tanh") * up
    assert (got.float() - exact).abs().max() <= 2e-2 * exact.abs().max() + 1e-6


def test_decode_step_of_the_model_matches_the_two_launches(monkeypatch):
    """A dense MLP on the kernel backend: one token (on a GPU through the fragment GEMV's fused form) gives what
    the projection and the GeGLU give as two launches."""
    from nvfp4kit.kernels.backend import TritonBackend
    from nvfp4kit.model.gemma4 import MLP

    mlp = MLP(96, 48, TritonBackend()).to(DEVICE)
    mlp.gate_up_proj.set_weight(random_weight(96, 96, seed=11))
    mlp.down_proj.set_weight(random_weight(96, 48, seed=12))
    x = torch.randn(1, 96, device=DEVICE)
    if ON_GPU:  # bf16, where a GPU runs the fragment GEMV's one-launch form (moe_frag.py)
        x = x.bfloat16()
    one = mlp(x)
    unfused = []
    real = fused.w4a16_linear
    monkeypatch.setattr(fused, "w4a16_linear", lambda *a, **k: unfused.append(1) or real(*a, **k))
    monkeypatch.setattr(fused, "frag_geglu_supported", lambda *args: False)
    two = mlp(x)
    assert unfused, "the two launches should run with the fused form off"
    if ON_GPU:  # the fused and two-launch sums are laid out per kernel there, rounded to bf16
        assert rel_error(one, two) < BF16_BOUND
    else:
        assert torch.equal(one, two)
