"""Tiny checkpoints for the eval tests: a BF16 one, its NVFP4 export, and one with another vocabulary."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def eval_pair(tmp_path_factory):
    """(bf16 folder, nvfp4 folder) of the tiny MoE shape; the export is made by `nvfp4kit quantize`."""
    from nvfp4kit.quant import quantize
    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval_pair")
    ref = write_tiny_checkpoint(root / "bf16", shape="moe", dtype=torch.bfloat16, outliers=True)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(f"line {i}: the quick brown fox {i * 7 % 13}" for i in range(200)))
    quant = root / "nvfp4"
    quantize(ref, quant, calib_data=[calib], num_samples=4, seq_len=48, progress=False)
    return ref, quant


@pytest.fixture(scope="session")
def eval_calib(eval_pair):
    """The calibration text `eval_pair`'s export was made with."""
    return eval_pair[0].parent / "calib.txt"


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data") / "text.jsonl"
    lines = [f'{{"text": "record {i}: {"abc def ghi " * (3 + i)}"}}' for i in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return path
