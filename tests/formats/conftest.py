"""A tiny NVFP4 export (our quantizer on the tiny BF16 MoE checkpoint) for the format readers' tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def quantized_tiny(tmp_path_factory):
    from nvfp4kit.quant import quantize
    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path_factory.mktemp("bf16"), shape="moe", dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("nvfp4") / "out"
    quantize(src, out, num_samples=2, seq_len=32, progress=False)
    return out
