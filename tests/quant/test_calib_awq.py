"""Activation-aware scales folded into the norms (calib_awq): never worse than unscaled by its own measure,
exact folds, and a refined tiny checkpoint whose full-precision path is the original model's."""

from __future__ import annotations

import torch

from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant.calib_awq import fold_into_norm, output_error, scaled_hessian, search_scales
from nvfp4kit.quant.calib_gptq import gptq_quantize_group
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.quant.calib_search import quantize_group_searched


def _searched(weights, hessian):
    return quantize_group_searched(weights, hessian=hessian)


def _data_free(weights, hessian):  # blind to the activations: what the scales have to make up for
    return quantize_group_searched(weights)


def test_fold_is_exact_in_the_stored_dtype():
    gen = torch.Generator().manual_seed(0)
    norm = (torch.rand(64, generator=gen) * 3).to(torch.bfloat16).float()
    norm[5] = 0.0  # a dead channel keeps s = 1
    scale = torch.rand(64, generator=gen) * 4 + 0.25
    folded, effective = fold_into_norm(norm, scale, torch.bfloat16)
    assert torch.equal(folded, folded.to(torch.bfloat16).float())  # stored as is
    assert effective[5] == 1 and folded[5] == 0
    assert torch.allclose(folded * effective, norm, rtol=1e-6)  # x * w == (x * w / s) * s
    live = norm != 0
    assert torch.allclose(effective[live], scale[live], rtol=1e-2)  # moved only by the rounding of w / s


def test_search_never_loses_to_unscaled_and_helps_outlier_channels():
    gen = torch.Generator().manual_seed(1)
    k = 64
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=gen)[:4]] = 30.0  # a few channels with large activations
    x = torch.randn(4096, k, generator=gen) * loud
    h = x.T @ x
    weights = [torch.randn(48, k, generator=gen), torch.randn(16, k, generator=gen)]
    norm = torch.ones(k)
    for quantizer in (_data_free, _searched, gptq_quantize_group):
        plain = output_error(weights, h, quantizer(weights, h), torch.ones(k))
        alpha, folded, scale, q = search_scales(weights, h, norm, quantizer)
        assert torch.equal(scaled_hessian(h, torch.ones(k)), h)
        err = output_error(weights, h, q, scale)
        assert err <= plain * (1 + 1e-6)
        if quantizer is _data_free:  # the loud channels gain from finer steps
            assert alpha > 0 and err < 0.9 * plain
            assert torch.allclose(folded * scale, norm, rtol=1e-6)


def _with_folds(model, src_model, reader, prefix):
    """The BF16 model `src_model` with the refined checkpoint's norm weights and each linear reading a folded
    norm scaled by w_old / w_new (no quantization): the fold alone."""
    for i, (layer, ref) in enumerate(zip(model.layers, src_model.layers)):
        p = f"{prefix}layers.{i}."
        for norm_name, targets in (
            ("input_layernorm", [layer.self_attn.qkv_proj]),
            ("pre_feedforward_layernorm", [layer.mlp.gate_up_proj]),
        ):
            old = getattr(ref, norm_name).weight.data
            new = reader.get(p + norm_name + ".weight").float()
            getattr(layer, norm_name).weight.data = new
            scale = torch.where(new != 0, old / torch.where(new != 0, new, 1.0), 1.0)
            for linear in targets:
                linear.set_weight(linear.weight * scale)
        if layer.moe:
            old = ref.pre_feedforward_layernorm_2.weight.data
            new = reader.get(p + "pre_feedforward_layernorm_2.weight").float()
            layer.pre_feedforward_layernorm_2.weight.data = new
            scale = torch.where(new != 0, old / torch.where(new != 0, new, 1.0), 1.0)
            layer.experts.set_weights(layer.experts.gate_up * scale, layer.experts.down)


def test_tiny_checkpoint_folded(bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path):
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    out = refine_checkpoint(src, base, tmp_path / "awq", method="gptq", awq=True, calib_data=[calib_file],
                            num_samples=num_samples, seq_len=seq_len, progress=False)  # fmt: skip
    ours, theirs = CheckpointReader(out), CheckpointReader(base)
    assert ours.names() == theirs.names()  # exactly the export's tensors: names, dtypes, shapes
    for name in ours.names():
        assert (ours.info(name).dtype, ours.info(name).shape) == (
            theirs.info(name).dtype,
            theirs.info(name).shape,
        )
    folded = [n for n in ours.names() if "layernorm" in n and not torch.equal(ours.get(n), theirs.get(n))]
    assert folded and all(n.split(".")[-2].startswith(("input_", "pre_feedforward")) for n in folded)
    quant = load_model(out, dtype=torch.float32)  # our loader reads it
    ids = torch.arange(100, 140)
    reference = load_model(src, dtype=torch.float32)
    refolded = load_model(src, dtype=torch.float32)
    _with_folds(refolded, reference, ours, refolded.config.weight_prefix)
    with torch.no_grad():
        assert torch.isfinite(quant(ids, ContiguousKVCache(quant.config).step(len(ids)))).all()
        want = reference(ids, ContiguousKVCache(reference.config).step(len(ids)))
        got = refolded(ids, ContiguousKVCache(refolded.config).step(len(ids)))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # the fold alone changes nothing but rounding


def test_block_act_order_keeps_blocks_and_maps_back(monkeypatch):
    """calib_gptq.ACT_ORDER: blocks swept by falling activation energy; round to nearest (order-blind) comes
    back bit for bit, and GPTQ with it is still a valid NVFP4 of the same weight."""
    from nvfp4kit.formats.nvfp4 import quantize as quantize_nvfp4
    from nvfp4kit.quant import calib_gptq

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)  # later columns louder
    h = x.T @ x
    perm = calib_gptq.block_order(h)
    assert sorted(perm.tolist()) == list(range(64)) and perm[0] // 16 == 3  # the loudest block first
    assert all(len({int(c) // 16 for c in perm[i : i + 16]}) == 1 for i in range(0, 64, 16))
    w = torch.randn(32, 64, generator=gen)
    plain = quantize_nvfp4(w)
    back = calib_gptq._unpermute(quantize_nvfp4(w[:, perm], scale_2=plain.scale_2), perm)
    assert torch.equal(back.packed, plain.packed) and torch.equal(back.scale.float(), plain.scale.float())
    monkeypatch.setattr(calib_gptq, "ACT_ORDER", True)
    (ordered,) = calib_gptq.gptq_quantize_group([w], h)
    monkeypatch.setattr(calib_gptq, "ACT_ORDER", False)
    (natural,) = calib_gptq.gptq_quantize_group([w], h)
    ones = torch.ones(64)
    assert output_error([w], h, [ordered], ones) < 1.5 * output_error([w], h, [natural], ones)
