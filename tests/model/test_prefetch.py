"""The L2 prefetch switch (model/prefetch.py): what NVFP4KIT_L2_PREFETCH accepts, and that a bad value is an error
that names the points instead of silently turning prefetching off."""

import pytest
import torch

from nvfp4kit.model.layers import Linear
from nvfp4kit.model.prefetch import POINTS, prefetch, prefetch_points, set_prefetch_points, weight_tensors


@pytest.mark.parametrize(
    ("raw", "points"),
    [
        ("", set()),
        ("0", set()),
        ("off", set()),
        ("all", set(POINTS)),
        ("1", set(POINTS)),
        ("o, mlp", {"o", "mlp"}),
    ],
)
def test_env_values(monkeypatch, raw, points):
    monkeypatch.setenv("NVFP4KIT_L2_PREFETCH", raw)
    assert prefetch_points() == points


def test_bad_env_value_names_the_points(monkeypatch):
    monkeypatch.setenv("NVFP4KIT_L2_PREFETCH", "o,attention")
    with pytest.raises(ValueError, match="qkv"):
        prefetch_points()
    with pytest.raises(ValueError, match="points"):
        set_prefetch_points({"lm_head"})


def test_override_wins_over_env(monkeypatch):
    monkeypatch.setenv("NVFP4KIT_L2_PREFETCH", "all")
    try:
        set_prefetch_points(frozenset())
        assert prefetch_points() == set()
    finally:
        set_prefetch_points(None)
    assert prefetch_points() == set(POINTS)


def test_weight_tensors_of_a_dense_linear_and_cpu_prefetch_is_a_no_op():
    linear = Linear(32, (16,))
    assert weight_tensors(linear) == []  # nothing loaded yet: nothing to prefetch
    linear.set_weight(torch.randn(16, 32))
    assert [t.shape for t in weight_tensors(linear)] == [torch.Size([16, 32])]
    set_prefetch_points(frozenset(POINTS))
    try:
        prefetch("o", torch.zeros(1, 32), linear.backend, linear)  # on the CPU: nothing to launch or join
    finally:
        set_prefetch_points(None)


def test_weight_tensors_of_an_nvfp4_linear_are_codes_and_block_scales():
    from nvfp4kit.formats.nvfp4 import quantize

    linear = Linear(32, (16,))
    linear.set_weight(quantize(torch.randn(16, 32)))
    packed, scale = weight_tensors(linear)
    assert packed.shape == (16, 16) and packed.dtype == torch.uint8
    assert scale.shape == (16, 2)
