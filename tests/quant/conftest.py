"""Shared fixtures: tiny BF16 Gemma 4 checkpoints, a calibration text file, and cached quantized exports."""

from __future__ import annotations

import pytest
import torch

SAMPLES, SEQ_LEN = 6, 48  # the tiny tokenizer is byte-level: one token per byte


@pytest.fixture(scope="session")
def calib_shape():
    """(num_samples, seq_len) every quantized fixture calibrates with."""
    return SAMPLES, SEQ_LEN


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    words = "river bread lamp orbit ledger violin glacier marathon satellite contract tea compiler".split()
    lines = [
        f"Note {i}: the {words[i % len(words)]} and the {words[(i * 7) % len(words)]} ({i * 13 % 97})."
        for i in range(400)
    ]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(lines))
    return path


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory):
    """Factory: bf16_checkpoint(shape="moe", outliers=True, multimodal=False) -> folder (read-only)."""
    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    made = {}

    def make(shape="moe", outliers=True, multimodal=False, **overrides):
        key = (shape, outliers, multimodal, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"bf16_{shape}")
            made[key] = write_tiny_checkpoint(
                folder,
                shape=shape,
                dtype=torch.bfloat16,
                outliers=outliers,
                multimodal=multimodal,
                **overrides,
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, bf16_checkpoint, calib_file):
    """Factory: quantized(shape="moe", **quantize_kwargs) -> our NVFP4 export of the tiny checkpoint (cached)."""
    from nvfp4kit.quant import quantize

    made = {}

    def make(shape="moe", outliers=True, multimodal=False, **kwargs):
        key = (shape, outliers, multimodal, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("nvfp4") / "out"
            args = dict(calib_data=[calib_file], num_samples=SAMPLES, seq_len=SEQ_LEN, progress=False)
            args.update(kwargs)
            quantize(bf16_checkpoint(shape, outliers, multimodal), out, calib_dtype=torch.float32, **args)
            made[key] = out
        return made[key]

    return make
