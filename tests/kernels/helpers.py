"""Shared helpers for the kernel tests (CPU interpreter in CI, native on a CUDA machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nvfp4kit.formats.nvfp4 import NVFP4Tensor, quantize, stack_experts
from nvfp4kit.tuning.cases import rel_error as rel_error  # the one definition (inf for non-finite output)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# bf16 outputs: the GPU rounds to nearest (~1e-3 relative); the CPU interpreter truncates (~3e-3)
BF16_BOUND = 1e-2
FP32_BOUND = 1e-5


def random_weight(n: int, k: int, *, seed: int) -> NVFP4Tensor:
    """Quantized random weight with block scales spread over many binades (subnormal scales included)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.exp2(torch.randint(-14, 1, (n, k // 16), generator=gen).float()).repeat_interleave(16, 1)
    w = torch.randn(n, k, generator=gen) * spread
    return quantize(w).to(DEVICE)


def random_experts(e: int, n: int, k: int, *, seed: int) -> NVFP4Tensor:
    return stack_experts([random_weight(n, k, seed=seed * 100 + i) for i in range(e)])


def compile_in_subprocess(script: str, arch: int) -> str:
    """Run a compile-check script for sm_`arch` in a fresh process and return its stdout; skips the test when
    this Triton build has no ptxas. A fresh process because TRITON_INTERPRET=1 (the CPU tests) interprets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script, str(arch)], env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas bundled with this triton build")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
