"""Norm tuning (calib_tune): the BF16 vectors of an NVFP4 checkpoint fitted to the BF16 model by distillation,
nothing else touched, and written only when the kept-aside calibration windows say it helps."""

from __future__ import annotations

import shutil

import torch

from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_tune
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.tokenizer import Tokenizer

TUNED = ("router.scale", "router.per_expert_scale", "router.proj.weight", "layer_scalar")


def _tunable(name):  # norm weights (input_layernorm, q_norm, post_feedforward_layernorm_1, ...) and TUNED
    return "norm" in name.split(".")[-2] or name.endswith(TUNED)


def _samples(src, calib_file, calib_shape):
    num_samples, seq_len = calib_shape
    return calibration_samples(Tokenizer(src), [calib_file], num_samples=num_samples, seq_len=seq_len)


def _kl(src, quant, samples):
    """Mean KL(BF16 || quantized) over the windows, computed here independently of calib_tune."""
    ref, q = load_model(src, dtype=torch.float32), load_model(quant, dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for tokens in samples:
            ids = torch.tensor(tokens)
            a = torch.log_softmax(ref(ids, ContiguousKVCache(ref.config).step(len(ids))), -1)
            b = torch.log_softmax(q(ids, ContiguousKVCache(q.config).step(len(ids))), -1)
            total += float((a.exp() * (a - b)).sum(-1).mean())
    return total / len(samples)


def test_tuning_changes_only_the_small_vectors_and_lowers_kl(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch
):
    src = bf16_checkpoint("moe")
    out = tmp_path / "tuned"
    shutil.copytree(quantized("moe"), out)
    samples = _samples(src, calib_file, calib_shape)
    monkeypatch.setattr(calib_tune, "BATCH_WINDOWS", 1)
    before = _kl(src, out, samples)
    report = calib_tune.tune_norms(src, out, samples, epochs=3, lr=1e-2)
    assert report.tensors > 0 and report.kl_after <= report.kl_before
    base, tuned = CheckpointReader(quantized("moe")), CheckpointReader(out)
    assert sorted(base.names()) == sorted(tuned.names())
    changed = []
    for name in base.names():
        assert (base.info(name).dtype, base.info(name).shape) == (
            tuned.info(name).dtype,
            tuned.info(name).shape,
        )
        if not torch.equal(base.get(name), tuned.get(name)):
            changed.append(name)
    assert report.written  # the tiny model's kept-aside window: 0.565 -> 0.526 when written
    assert changed and [n for n in changed if not _tunable(n)] == []
    assert _kl(src, out, samples) < before  # on all windows, measured without calib_tune's code


def test_tuning_that_cannot_help_writes_nothing(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path
):
    src = bf16_checkpoint("moe")
    out = tmp_path / "untouched"
    shutil.copytree(quantized("moe"), out)
    report = calib_tune.tune_norms(src, out, _samples(src, calib_file, calib_shape), epochs=1, lr=0.0)
    assert not report.written and report.kl_after == report.kl_before
    base, same = CheckpointReader(quantized("moe")), CheckpointReader(out)
    assert all(torch.equal(base.get(n), same.get(n)) for n in base.names())
