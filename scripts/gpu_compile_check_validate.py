"""Does `nvfp4kit bench compile` see what the card sees? Its records against real launches on this GPU.

For the 26B-A4B cases of `bench/compile_check.py` (linears, their dequantizer and the MoE at 1 / 64 / 2048 tokens;
attention cases hold a pool object and are left out), each case is
run twice on the present card: once inside `compile_for(<this card's capability>, <its SMs>)` (compiled on the
host, registers read by cuobjdump, nothing launched) and once for real, where Triton's loaded kernel reports its
own registers, spills and shared memory. Prints both side by side and exits 1 when any launch differs.

    PYTHONPATH=src python3 scripts/gpu_compile_check_validate.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.runtime.jit import JITFunction

from nvfp4kit.bench.compile_check import linear_cases, moe_cases
from nvfp4kit.config import load_preset
from nvfp4kit.kernels.configs import sm_count
from nvfp4kit.tuning.cross_compile import compile_for


def real_launches(launch) -> list[tuple[str, int, int, int]]:
    """(kernel, shared bytes, registers, spill bytes) of every launch `launch` makes on the GPU."""
    seen: list[tuple[str, int, int, int]] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self.__name__, kernel.metadata.shared, kernel.n_regs, kernel.n_spills))
        return kernel

    JITFunction.run = run
    try:
        launch()
        torch.cuda.synchronize()
    finally:
        JITFunction.run = original
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    cfg = load_preset("gemma-4-26b-a4b")
    device = torch.device("cuda")
    capability, sms = torch.cuda.get_device_capability(), sm_count(device)
    tokens = (1, 64, 2048)
    cases = [*linear_cases(cfg, tokens), *moe_cases(cfg, tokens)]
    rows, differ = [], 0
    for case, m, launch in cases:
        with compile_for(capability, sms, zero_allocations=True) as predicted:
            launch()  # CPU tensors: the stand-in card is this one
        moved = _on_gpu(launch)
        if moved is None:
            continue
        actual = real_launches(moved)
        for p, (name, shared, regs, spills) in zip(predicted, actual):
            same = p.kernel == name and p.shared == shared and p.registers == regs
            differ += not same
            rows.append({"case": case, "m": m, "kernel": name, "predicted": [p.shared, p.registers, p.spills],
                         "actual": [shared, regs, spills], "same": same})  # fmt: skip
            print(f"{'ok ' if same else 'DIFF'} {case:40s} M={m:<5d} {name:28s} smem {p.shared:>6d} / {shared:<6d} "
                  f"regs {p.registers} / {regs} spill {p.spills} / {spills}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"{len(rows)} launches compared, {differ} differ")
    return 1 if differ else 0


def _on_gpu(launch):
    """The case's launch with its CPU tensors moved to the GPU (closures carry them as default arguments)."""
    defaults = getattr(launch, "__defaults__", None)
    if defaults is None:
        return None  # a closure over a pool object: not moved here
    moved = tuple(_to_cuda(d) for d in defaults)
    return lambda: launch(*moved)


def _to_cuda(value):
    from nvfp4kit.formats.nvfp4 import NVFP4Tensor

    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, NVFP4Tensor):
        return value.to("cuda")
    return value


if __name__ == "__main__":
    sys.exit(main())
