"""Compile every W4A16 kernel for SM80, SM86 and SM89 on the Hopper card: proof the code uses nothing Hopper-only.

Triton 3.6 has no switch to build for another architecture, so this points Triton's target query at the
older chip; compilation (Triton passes, PTX, ptxas for that SM) must succeed, while loading the resulting
cubin on the H100 is expected to fail (a cubin runs only on its own major architecture).
Usage on the GPU machine: PYTHONPATH=src python3 scripts/gpu_kernels_portability.py
"""

from __future__ import annotations

import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.errors import CompilationError

from nvfp4kit.bench.cases import random_nvfp4
from nvfp4kit.kernels import LinearConfig, MoEConfig, fused_moe, w4a16_linear


def _cases():
    w = random_nvfp4(256, 512)
    gu, dn = random_nvfp4(192, 512, experts=4), random_nvfp4(512, 96, experts=4)
    ids = torch.tensor([[0, 1], [2, 1], [3, 0]], device="cuda")
    route = torch.rand(3, 2, device="cuda")
    for m, cfg in (
        (1, LinearConfig("gemv", 1, 32, 256, 2, decode="asm")),
        (4, LinearConfig("dot", 16, 64, 128, 2, decode="asm")),
        (256, LinearConfig("dot", 128, 128, 64, num_warps=8, decode="asm")),
        (256, LinearConfig("dot", 128, 128, 64, swap_ab=True, num_warps=8, decode="bits")),
    ):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        yield (
            f"linear M={m} {cfg.kernel} swap={cfg.swap_ab} {cfg.decode}",
            lambda x=x, cfg=cfg: w4a16_linear(x, w, config=cfg),
        )
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    for mode in (MoEConfig(sorted=False, decode="asm"), MoEConfig(sorted=False, down_mode="pair", decode="asm"),
                 MoEConfig(block_m=16, decode="asm")):  # fmt: skip
        yield (
            f"moe sorted={mode.sorted} down={mode.down_mode}",
            lambda mode=mode: fused_moe(x, ids, route, gu, dn, config=mode),
        )


def check(arch: int) -> int:
    # Triton reads the target once per device and process, so each architecture runs in its own process
    triton.runtime.driver.active.get_current_target = lambda: GPUTarget("cuda", arch, 32)
    failures = 0
    for name, call in _cases():
        try:
            call()
            torch.cuda.synchronize()
            verdict = "compiled and ran"
        except CompilationError as exc:
            verdict, failures = f"COMPILE FAILED: {str(exc).splitlines()[0][:120]}", failures + 1
        except Exception as exc:  # compiled; the sm_{arch} cubin cannot load on this sm_90 card
            text = str(exc).replace("\n", " ")
            if "PassManager" in text or "ptxas" in text:
                verdict, failures = f"COMPILE FAILED: {text[:160]}", failures + 1
            else:
                verdict = f"compiled (load on sm_90 refused: {type(exc).__name__})"
        print(f"sm_{arch}  {name:<40} {verdict}", flush=True)
    return failures


def main() -> int:
    if len(sys.argv) > 1:
        return 1 if check(int(sys.argv[1])) else 0
    failed = [
        arch for arch in (80, 86, 89) if subprocess.run([sys.executable, __file__, str(arch)]).returncode
    ]
    print("portability:", "OK" if not failed else f"failures on sm_{failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
