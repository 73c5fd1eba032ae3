"""Triton launches of one decode step of the tiny models on the `triton` backend, counted by kind.

At batch 1 a decode step is a chain of short launches that each cost a few microseconds whatever their bytes, so
the count is pinned: a change that adds a launch per layer fails here and has to update the table below.
Only Triton kernels are counted (attention here is the contiguous cache's torch attention; dense BF16 linears
such as the router and the lm_head go to cuBLAS).

The norm regions: a layer has two, `ffn_inputs` (the post-attention residual add and every normed copy the FFN
reads) and `ffn_tail` (which also norms the next layer's input, or the final norm after the last layer), plus
one `rms_norm` per step for the first layer's input. Before they were folded together a layer had four (input
norm, post-attention add + norm, the FFN's input norms, tail) and the step one more (the final norm): the tiny
MoE step went from 13 launches a layer + 1 to 11 + 1, the dense one from 10 + 1 to 8 + 1, E2B from 12 + 2 to
10 + 2 (its per-layer-input block is a second tail launch, with the layer scalar and the next norm inside).

At decode sizes a MoE layer's `ffn_inputs` and its router (projection and top-k, already one launch) are one
launch, `ffn_inputs_routed` (kernels/ffn_router.py): the tiny MoE step went from 11 launches a layer + 1 to
10 + 1.
"""

from collections import Counter

import pytest
import torch
from triton.runtime.jit import KernelInterface

from nvfp4kit.config import config_from_dict
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny import tiny_text_config

from .helpers import DEVICE

PER_LAYER = {  # launches per layer by kind; every layer of a tiny model has the same list
    "moe": dict(linear=4, qkv_norm_rope=1, ffn_inputs_routed=1, geglu=1, moe=2, ffn_tail=1),
    "dense": dict(linear=4, qkv_norm_rope=1, ffn_inputs=1, geglu=1, ffn_tail=1),
    "e2b": dict(linear=5, qkv_norm_rope=1, ffn_inputs=1, geglu=1, ffn_tail=2),  # + per_layer_input_gate
}
PER_STEP = {  # launches once per step: the first layer's input norm, the logits' softcap (after the lm_head)
    "moe": dict(rms_norm=1, softcap=1),
    "dense": dict(rms_norm=1, softcap=1),
    "e2b": dict(rms_norm=1, linear=1, softcap=1),  # + per_layer_model_projection
}


def _kind(kernel: object) -> str:
    """`_w4a16_gemv_kernel` -> linear, `_moe_down_split_kernel` -> moe, `_geglu_kernel` -> geglu."""
    while hasattr(kernel, "fn"):  # autotuner -> JIT function -> python function
        kernel = kernel.fn
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    if name.startswith(("w4a16_", "w8a16_")):
        return "linear"  # which GEMV/GEMM variant a shape picks is the configs' business
    if name.endswith("route"):
        return "route"  # top-k routing, with or without the router's projection folded in: one launch
    return "moe" if name.startswith("moe_") else name


@pytest.fixture
def launches(monkeypatch):
    """A Counter of kind -> launches, filled by every `kernel[grid](...)` while the test runs."""
    counts: Counter[str] = Counter()
    launch = KernelInterface.__getitem__

    def counted(kernel, grid):
        run = launch(kernel, grid)

        def call(*args, **kwargs):
            counts[_kind(kernel)] += 1
            return run(*args, **kwargs)

        return call

    monkeypatch.setattr(KernelInterface, "__getitem__", counted)
    return counts


@pytest.mark.parametrize("shape", sorted(PER_LAYER))
def test_decode_step_launches(shape, launches):
    cfg = config_from_dict(tiny_text_config(shape))
    model = random_model(
        cfg, quantized=True, dtype=torch.float32, device=DEVICE, backend=TritonBackend(), seed=3
    )
    cache = ContiguousKVCache(cfg)
    with torch.no_grad():
        for tokens in (torch.tensor([2, 3, 4]), torch.tensor([5])):  # a short prompt, then one decode step
            launches.clear()
            ctx = cache.step(tokens.numel(), device=DEVICE)
            model(tokens.to(DEVICE), ctx)
            ctx.commit()
    expected = Counter({kind: n * cfg.num_hidden_layers for kind, n in PER_LAYER[shape].items()})
    expected.update(PER_STEP[shape])
    assert dict(launches) == dict(expected)
