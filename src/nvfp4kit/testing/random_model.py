"""A `Gemma4Model` with random weights built directly on a device, with no checkpoint.

Benchmarks use it to measure the real 26B-A4B shapes without a download: NVFP4 weights are random packed
codes with plausible FP8 block scales (every matrix entry of order 1/sqrt(in_features), as in a trained
model), or BF16 weights of the same scale for the baseline. Only what the model holds is allocated, on the
target device, one tensor at a time.
"""

from __future__ import annotations

import math

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.nvfp4 import BLOCK, NVFP4Tensor
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.layers import Linear
from nvfp4kit.model.ops import OpBackend, Weight, select_backend

_MEAN_ABS_E2M1 = 2.5625  # mean |value| of the 16 E2M1 codes, uniform


def random_nvfp4(
    *lead: int,
    out_features: int,
    in_features: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> NVFP4Tensor:
    """Random NVFP4 weight(s) [*lead, N, K] whose entries have magnitude about 1/sqrt(K)."""
    packed = torch.randint(0, 256, (*lead, out_features, in_features // 2), dtype=torch.uint8, device=device,
                           generator=generator)  # fmt: skip
    scale = (
        torch.rand(*lead, out_features, in_features // BLOCK, device=device, generator=generator) * 224 + 224
    )
    scale_2 = torch.full(lead, 1.0 / (math.sqrt(in_features) * _MEAN_ABS_E2M1 * 336), device=device)
    return NVFP4Tensor(packed, scale.to(torch.float8_e4m3fn), scale_2.float())


def random_dense(
    *shape: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    w = torch.randn(*shape, device=device, dtype=torch.float32, generator=generator)
    return (w * shape[-1] ** -0.5).to(dtype)


def random_model(
    cfg: Gemma4TextConfig,
    *,
    quantized: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    backend: OpBackend | None = None,
    seed: int = 0,
) -> Gemma4Model:
    """Every text linear NVFP4 (the seed's recipe) when `quantized`, else BF16; embeddings and routers BF16."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = Gemma4Model(cfg, backend=backend or select_backend(device))  # triton kernels on CUDA

    def weight(linear: Linear, keep_dense: bool = False) -> None:
        n, k = linear.out_features, linear.in_features
        if quantized and not keep_dense and k % BLOCK == 0:
            w: Weight = random_nvfp4(out_features=n, in_features=k, device=device, generator=gen)
        else:
            w = random_dense(n, k, dtype=dtype, device=device, generator=gen)
        linear.set_weight(w)

    model.embed_tokens = random_dense(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device, generator=gen
    )
    if cfg.hidden_size_per_layer_input:
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        model.embed_tokens_per_layer = random_dense(cfg.vocab_size_per_layer_input, n * p, dtype=dtype, device=device,
                                                    generator=gen)  # fmt: skip
        weight(model.per_layer_model_projection)
    for layer in model.layers:
        weight(layer.self_attn.qkv_proj)
        weight(layer.self_attn.o_proj)
        weight(layer.mlp.gate_up_proj)
        weight(layer.mlp.down_proj)
        if layer.moe:
            weight(layer.router.proj, keep_dense=True)
            e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
            if quantized:
                gate_up: Weight = random_nvfp4(
                    e, out_features=2 * i, in_features=h, device=device, generator=gen
                )
                down: Weight = random_nvfp4(e, out_features=h, in_features=i, device=device, generator=gen)
            else:
                gate_up = random_dense(e, 2 * i, h, dtype=dtype, device=device, generator=gen)
                down = random_dense(e, h, i, dtype=dtype, device=device, generator=gen)
            layer.experts.set_weights(gate_up, down)
        if layer.ple:
            weight(layer.per_layer_input_gate)
            weight(layer.per_layer_projection)
    for param in model.parameters():  # norms, router scales: around 1
        param.data = (1.0 + 0.05 * torch.randn(param.shape, device=device, generator=gen)).to(dtype)
    return model.to(device)
