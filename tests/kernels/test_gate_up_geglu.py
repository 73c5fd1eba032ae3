"""The dense MLP's gate_up projection + GeGLU in one launch (one-token GEMV) against the two launches it replaces.

Shapes carry the awkward traits of 26B-A4B's gate_up (2 x 2112 rows, K = 2816): an intermediate size that is not a
multiple of the row tile, K not a multiple of the K tile. The fused kernel rounds the projections as the separate
launches do, so results must be bitwise equal, on the CPU interpreter and on a GPU.
"""

import pytest
import torch

from nvfp4kit.kernels import gate_up_geglu as fused
from nvfp4kit.kernels.configs import LinearConfig
from nvfp4kit.kernels.geglu import geglu
from nvfp4kit.kernels.w4a16_linear import w4a16_linear

from .helpers import BF16_BOUND, DEVICE, ON_GPU, random_weight, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    monkeypatch.setattr(fused, "FUSE", True)  # opt-in in the engine until timed on a GPU


def _pin(monkeypatch, cfg: LinearConfig) -> None:
    """Both paths take `cfg` (the fused kernel and the separate linear read the same selection)."""
    monkeypatch.setattr(fused, "select_linear_config", lambda *a, **kw: cfg)
    monkeypatch.setattr("nvfp4kit.kernels.w4a16_linear.select_linear_config", lambda *a, **kw: cfg)


@pytest.mark.parametrize("inter,k", [(44, 144), (40, 256), (8, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tile", [(1, 8, 64), (2, 16, 256)]
)  # (block_m, block_n, block_k): masked K tiles too
def test_one_launch_equals_projection_then_geglu(monkeypatch, inter, k, dtype, tile):
    block_m, block_n, block_k = tile
    cfg = LinearConfig("gemv", block_m, block_n, block_k, 1, num_warps=4, num_stages=2, decode="asm")
    _pin(monkeypatch, cfg)
    weight = random_weight(2 * inter, k, seed=inter + k)
    x = torch.randn(block_m, k, device=DEVICE).to(dtype)
    assert fused.fuses(x, weight)
    got = fused.gate_up_geglu(x, weight)
    want = geglu(w4a16_linear(x, weight))
    assert got.shape == (block_m, inter) and got.dtype == dtype
    assert torch.equal(got, want)
    ref = x.float() @ weight.dequantize(torch.float32).T
    gate, up = ref.chunk(2, dim=-1)
    exact = torch.nn.functional.gelu(gate, approximate="tanh") * up
    assert (got.float() - exact).abs().max() <= 2e-2 * exact.abs().max() + 1e-6


def test_other_sizes_and_tiles_keep_two_launches(monkeypatch):
    weight = random_weight(2 * 40, 96, seed=3)
    x = torch.randn(1, 96, device=DEVICE)
    split = LinearConfig("gemv", 1, 8, 32, 2, decode="asm")
    dot = LinearConfig("dot", 16, 16, 64, 1, decode="asm")
    for cfg in (split, dot):
        _pin(monkeypatch, cfg)
        assert not fused.fuses(x, weight)
        assert torch.equal(fused.gate_up_geglu(x, weight), geglu(w4a16_linear(x, weight)))
    _pin(monkeypatch, LinearConfig("gemv", 1, 8, 32, 1, decode="asm"))
    assert fused.fuses(x, weight)
    assert not fused.fuses(torch.randn(2, 96, device=DEVICE), weight)  # more tokens than the tile's rows
    assert not fused.fuses(x.half(), weight)  # fp16 keeps the Triton linear's own scaling path
    assert not fused.fuses(x, weight.dequantize(torch.float32))  # dense weights: cuBLAS
    monkeypatch.setattr(fused, "FUSE", False)
    assert not fused.fuses(x, weight)


def test_decode_step_of_the_model_uses_it_and_matches(monkeypatch):
    """A dense MLP on the kernel backend: one token goes through the fused launch, same output as unfused."""
    from nvfp4kit.kernels.backend import TritonBackend
    from nvfp4kit.model.gemma4 import MLP

    mlp = MLP(96, 48, TritonBackend()).to(DEVICE)
    mlp.gate_up_proj.set_weight(random_weight(96, 96, seed=11))
    mlp.down_proj.set_weight(random_weight(96, 48, seed=12))
    unfused = []  # the two-launch path's projection; on a GPU one token may take the fragment GEMV's fused form
    real = fused.w4a16_linear
    monkeypatch.setattr(fused, "w4a16_linear", lambda *a, **k: unfused.append(1) or real(*a, **k))
    x = torch.randn(1, 96, device=DEVICE)
    if ON_GPU:  # bf16, where a GPU runs the fragment GEMV's one-launch form (moe_frag.py)
        x = x.bfloat16()
    one = mlp(x)
    assert not unfused, "one token should take a fused launch"
    monkeypatch.setattr(fused, "FUSE", False)
    monkeypatch.setattr(fused, "frag_geglu_supported", lambda *args: False)
    two = mlp(x)
    assert unfused, "the two launches should run with both fused forms off"
    if ON_GPU:  # the fused and two-launch sums are laid out per kernel there, rounded to bf16
        assert rel_error(one, two) < BF16_BOUND
    else:
        assert torch.equal(one, two)
