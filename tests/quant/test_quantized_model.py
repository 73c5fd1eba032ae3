"""The quantized tiny model: packed weights decode to the fake-quant reference, logits as close as the format allows."""

from __future__ import annotations

import warnings

import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.layers import store_weight
from nvfp4kit.model.loader import load_model

SEQUENCES = [
    torch.arange(110, 142),
    torch.arange(300, 140, -5),
    torch.tensor([2, 105, 120, 121, 122, 106] * 4),
]


def log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids, ContiguousKVCache(model.config).step(len(ids))), dim=-1)


def kl(p, q):
    return (p.exp() * (p - q)).sum(-1).mean().item()


def nvfp4_weights(model):
    """(module, buffer name, NVFP4Tensor) for every packed weight the model holds."""
    for module in model.modules():
        for name in ("weight", "gate_up", "down"):
            packed = getattr(module, f"{name}_packed", None)
            if packed is not None:
                scale, scale_2 = getattr(module, f"{name}_scale"), getattr(module, f"{name}_scale_2")
                yield module, name, NVFP4Tensor(packed, scale, scale_2)


def test_model_keeps_packed_weights(quantized):
    model = load_model(quantized("moe"), dtype=torch.float32)
    found = list(nvfp4_weights(model))
    # per layer: fused qkv, o, dense gate_up, down, experts gate_up, experts down
    assert len(found) == 6 * 6
    for module, name, w in found:
        assert getattr(module, name, None) is None, "no dense copy next to the packed weight"
        assert w.packed.dtype == torch.uint8 and w.scale.dtype == torch.float8_e4m3fn


def test_matches_fake_quant_reference_exactly(quantized):
    """Dequantize every weight into a dense fp32 model: same logits to the last bit (W4A16 semantics)."""
    model = load_model(quantized("moe"), dtype=torch.float32)
    reference = load_model(quantized("moe"), dtype=torch.float32)
    for module, name, w in nvfp4_weights(reference):
        store_weight(module, name, w.dequantize(torch.float32), shape=w.shape)
    for ids in SEQUENCES:
        assert torch.equal(log_probs(model, ids), log_probs(reference, ids))


def test_matches_transformers_with_dequantized_weights(bf16_checkpoint, quantized):
    """An independent reference: transformers' Gemma4ForCausalLM in fp32 with our dequantized weights."""
    import transformers

    out = quantized("moe")
    reader = CheckpointReader(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Gemma4ForCausalLM.from_pretrained(bf16_checkpoint("moe"), dtype=torch.float32)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name in reader.names():
            if not name.endswith(".weight_scale_2"):
                continue
            module = name.removesuffix(".weight_scale_2")
            dense = NVFP4Tensor(
                reader.get(f"{module}.weight"), reader.get(f"{module}.weight_scale"), reader.get(name)
            ).dequantize(torch.float32)
            head, _, proj = module.rpartition(".")
            if ".experts." in module:  # experts.{e}.gate_proj -> rows of the fused [E, 2I, H] parameter
                experts, _, e = head.rpartition(".")
                fused = params[f"{experts}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"]
                rows = {"gate_proj": slice(0, dense.shape[0]), "up_proj": slice(dense.shape[0], None)}
                fused[int(e)][rows.get(proj, slice(None))] = dense
            else:
                params[f"{module}.weight"].copy_(dense)
        model = load_model(out, dtype=torch.float32)
        for ids in SEQUENCES:
            theirs = torch.log_softmax(hf(ids[None]).logits[0].float(), dim=-1)
            torch.testing.assert_close(log_probs(model, ids), theirs, rtol=0, atol=1e-4)


def test_weights_reconstruct_within_nvfp4_error(bf16_checkpoint, quantized):
    bf16 = load_model(bf16_checkpoint("moe"), dtype=torch.float32)
    model = load_model(quantized("moe"), dtype=torch.float32)
    dense = {name: module for name, module in bf16.named_modules()}
    errors = []
    for name, module in model.named_modules():
        for attr in ("weight", "gate_up", "down"):
            packed = getattr(module, f"{attr}_packed", None)
            if packed is None:
                continue
            w = NVFP4Tensor(packed, getattr(module, f"{attr}_scale"), getattr(module, f"{attr}_scale_2"))
            ref = getattr(dense[name], attr)
            errors.append(((w.dequantize() - ref).norm() / ref.norm()).item())
    # E2M1 with FP8 block scales: ~9% relative RMS error on Gaussian weights with outlier channels
    assert 0.05 < min(errors) and max(errors) < 0.12, (min(errors), max(errors))


def test_logits_close_to_bf16(bf16_checkpoint, quantized):
    """KL(BF16 || NVFP4) on a few sequences, against the KL that Gaussian noise of the same RMS error gives.

    The tiny random model is chaotic (near-uniform outputs, sharp routing), so absolute KL is large for any
    perturbation; quantization must cost no more than an unbiased perturbation of its own size.
    """
    bf16 = load_model(bf16_checkpoint("moe"), dtype=torch.float32)
    model = load_model(quantized("moe"), dtype=torch.float32)
    noisy = load_model(bf16_checkpoint("moe"), dtype=torch.float32)
    modules = dict(noisy.named_modules())
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        for attr in ("weight", "gate_up", "down"):
            packed = getattr(module, f"{attr}_packed", None)
            if packed is None:
                continue
            w = NVFP4Tensor(packed, getattr(module, f"{attr}_scale"), getattr(module, f"{attr}_scale_2"))
            ref = getattr(modules[name], attr)
            rms = (w.dequantize() - ref).pow(2).mean().sqrt()
            store_weight(
                modules[name], attr, ref + torch.randn(ref.shape, generator=gen) * rms, shape=ref.shape
            )
    kl_q = [kl(log_probs(bf16, ids), log_probs(model, ids)) for ids in SEQUENCES]
    kl_noise = [kl(log_probs(bf16, ids), log_probs(noisy, ids)) for ids in SEQUENCES]
    print(
        f"KL(BF16||NVFP4) per sequence: {[round(x, 4) for x in kl_q]}; equal-RMS noise: {[round(x, 4) for x in kl_noise]}"
    )
    assert sum(kl_q) < 1.5 * sum(kl_noise)
