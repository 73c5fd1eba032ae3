"""Opcode histogram of the compiled W4A16 kernels (one cubin per variant) to see what the decode costs.

Usage on the GPU machine: PYTHONPATH=src python3 scripts/gpu_kernels_sass.py
Each variant compiles into its own Triton cache folder; `cuobjdump -sass` lists the instructions.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "gemv_bits": "LinearConfig('gemv', 1, 32, 256, 1)",
    "gemv_asm": "LinearConfig('gemv', 1, 32, 256, 1, decode='asm')",
    "dot16_bits": "LinearConfig('dot', 16, 64, 128, 1, num_stages=4)",
    "dot16_asm": "LinearConfig('dot', 16, 64, 128, 1, num_stages=4, decode='asm')",
    "dot128_bits": "LinearConfig('dot', 128, 128, 64, 1, num_warps=8, num_stages=3)",
    "dot128_asm": "LinearConfig('dot', 128, 128, 64, 1, num_warps=8, num_stages=3, decode='asm')",
}
CHILD = """
import torch
from nvfp4kit.tuning.cases import random_nvfp4
from nvfp4kit.kernels.configs import LinearConfig
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
w = random_nvfp4(8192, 2816)
x = torch.randn({m}, 2816, device="cuda", dtype=torch.bfloat16)
w4a16_linear(x, w, config={cfg})
torch.cuda.synchronize()
"""
WATCH = ("LDG", "LDS", "STS", "LDSM", "HMMA", "HGMMA", "LOP3", "SHF", "PRMT", "IMAD", "F2F", "F2FP", "HMUL2", "HFMA2",
         "FFMA", "FMUL", "HADD2", "I2F", "SHFL", "BAR", "IADD3", "SEL", "FSEL")  # fmt: skip


def histogram(cubin: Path) -> collections.Counter:
    sass = subprocess.run(
        ["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if match:
            ops[match.group(1).split(".")[0]] += 1
    return ops


def main() -> int:
    print(f"{'variant':<14}" + "".join(f"{w:>7}" for w in WATCH) + f"{'total':>7}")
    for name, cfg in VARIANTS.items():
        with tempfile.TemporaryDirectory() as cache:
            m = 128 if "128" in name else 1
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            done = subprocess.run(
                [sys.executable, "-c", CHILD.format(m=m, cfg=cfg)], env=env, capture_output=True
            )
            if done.returncode:
                print(f"{name:<14} failed: {done.stderr.decode()[-300:]}")
                continue
            cubins = [p for p in Path(cache).rglob("*.cubin") if "w4a16" in p.name]
            for cubin in cubins:
                ops = histogram(cubin)
                print(
                    f"{name:<14}" + "".join(f"{ops.get(w, 0):>7}" for w in WATCH) + f"{sum(ops.values()):>7}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
