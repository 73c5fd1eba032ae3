"""Scale search, GPTQ rounding and checkpoint refinement (src/nvfp4kit/quant/calib_*.py)."""

import pytest
import torch

from nvfp4kit.formats.nvfp4 import e2m1_decode, e2m1_encode, global_scale, quantize, unpack_nibbles
from nvfp4kit.quant.calib_gptq import gptq_quantize_group
from nvfp4kit.quant.calib_search import e2m1_round, quantize_group_searched, weight_error


def _weights(seed, n=64, k=128):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / 16
    w[:, torch.randperm(k, generator=gen)[:4]] *= 12  # outlier input channels, as real weights have
    return w


def _activations(seed, k=128, t=2048):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + torch.randn(k, k, generator=gen) / 12
    x = torch.randn(t, k, generator=gen) @ mix
    x[:, :6] *= 8
    return x


def test_arithmetic_rounding_equals_the_encoder():
    x = torch.cat(
        [torch.randn(10_000) * 4, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, -0.25])]
    )
    assert torch.equal(e2m1_round(x), e2m1_decode(e2m1_encode(x)))


@pytest.mark.parametrize("seed", [0, 1])
def test_search_never_loses_to_max_and_shares_the_group_scale(seed):
    q_w, k_w = _weights(seed), _weights(seed + 10, n=32)
    h = _activations(seed).T @ _activations(seed)
    for hessian in (None, h):
        searched = quantize_group_searched([q_w, k_w], hessian=hessian)
        assert torch.equal(searched[0].scale_2, searched[1].scale_2)
        shared = global_scale(torch.maximum(q_w.abs().max(), k_w.abs().max()))
        plain = [quantize(q_w, scale_2=shared), quantize(k_w, scale_2=shared)]
        if hessian is None:
            for w, s, p in zip((q_w, k_w), searched, plain):
                assert weight_error(w, s) <= weight_error(w, p)
        total = sum(weight_error(w, s, hessian=hessian) for w, s in zip((q_w, k_w), searched))
        assert total < sum(weight_error(w, p, hessian=hessian) for w, p in zip((q_w, k_w), plain))


def test_searched_weights_are_standard_nvfp4():
    w = _weights(3)
    (q,) = quantize_group_searched([w])
    again = quantize(q.dequantize(torch.float32), scale_2=q.scale_2, block_scale=q.scale)
    # codes mean what the format says (value * scale * scale_2); only the sign of zero may differ
    assert torch.equal(unpack_nibbles(again.packed) & 7, unpack_nibbles(q.packed) & 7)
    assert torch.equal(again.dequantize(), q.dequantize())


def test_gptq_cuts_output_error_on_fresh_inputs_of_the_same_distribution():
    w = _weights(4)
    x_cal, x_new = _activations(5), _activations(5, t=4096)[2048:]
    h_cal, h_new = x_cal.T @ x_cal, x_new.T @ x_new
    (searched,) = quantize_group_searched([w], hessian=h_cal)
    (gptq,) = gptq_quantize_group([w], h_cal)
    assert weight_error(w, gptq, hessian=h_new) < 0.7 * weight_error(w, searched, hessian=h_new)


def test_gptq_without_correlations_is_the_searched_quantization():
    w = _weights(6)
    eye = torch.eye(w.shape[1]) * 1000.0
    (gptq,) = gptq_quantize_group([w], eye, damping=0.0)
    (searched,) = quantize_group_searched([w], hessian=eye)
    assert torch.equal(gptq.packed, searched.packed) and torch.equal(
        gptq.scale.float(), searched.scale.float()
    )


def test_norm_aware_hessian_weights_tokens_by_their_normalised_output():
    from nvfp4kit.quant.calib_hessian import HessianBackend

    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(6, 32, generator=gen), torch.randn(16, 32, generator=gen)
    x[2] *= 0.01  # a token whose output (and so its RMS) is tiny: the norm after the linear amplifies it
    plain, aware = HessianBackend(), HessianBackend(norm_aware=True)
    for backend in (plain, aware):
        backend.watch_normed(w, "proj", group=8)
        backend.linear(x, w)
    assert torch.allclose(plain.hessians["proj"], x.T @ x)
    ms = (x @ w.T).reshape(6, -1, 8).pow(2).mean(-1)
    c = (1 / ms).mean(-1).clamp(max=100 * (1 / ms).mean(-1).median())
    assert torch.allclose(aware.hessians["proj"], (x * c[:, None]).T @ x, rtol=1e-4)
    assert c[2] == c.max()


@pytest.mark.parametrize("method", ["mse", "gptq"])
def test_refined_checkpoint_has_the_same_tensors_and_follows_the_reference_closer(
    eval_pair, eval_calib, tmp_path, method
):
    from nvfp4kit.eval import compare_checkpoints, load_samples
    from nvfp4kit.formats.safetensors_io import CheckpointReader
    from nvfp4kit.quant.calib_refine import refine_checkpoint
    from nvfp4kit.tokenizer import Tokenizer

    ref, quant = eval_pair
    out = refine_checkpoint(ref, quant, tmp_path / method, method=method, calib_data=[eval_calib],
                            num_samples=4, seq_len=48, progress=False)  # fmt: skip
    before, after = CheckpointReader(quant), CheckpointReader(out)
    assert sorted(before.names()) == sorted(after.names())
    changed = 0
    for name in before.names():
        a, b = before.get(name), after.get(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        if name.endswith(("input_scale", "norm.weight", "embed_tokens.weight")):
            assert torch.equal(a, b), name
        changed += name.endswith(".weight_scale") and not torch.equal(a.float(), b.float())
    assert changed > 0
    assert (out / "hf_quant_config.json").read_text() == (quant / "hf_quant_config.json").read_text()
    samples = load_samples([eval_calib], Tokenizer(ref), num_samples=4, seq_len=48)
    kl_max = compare_checkpoints(ref, quant, samples).agreement.kl_mean
    kl_new = compare_checkpoints(ref, out, samples).agreement.kl_mean  # loads strictly through our loader
    assert kl_new < kl_max


def test_refine_refuses_bad_inputs(eval_pair, tmp_path):
    from nvfp4kit.quant.calib_refine import refine_checkpoint

    ref, quant = eval_pair
    with pytest.raises(ValueError, match="unknown calibration method"):
        refine_checkpoint(ref, quant, tmp_path / "x", method="awq")
    with pytest.raises(ValueError, match="hf_quant_config.json"):
        refine_checkpoint(ref, ref, tmp_path / "y", method="mse")
