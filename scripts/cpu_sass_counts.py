"""Main-loop SASS instruction counts of the W4A16 and MoE kernels, compiled on the CPU for a card that is not here.

The batch-16/64 MoE and the small-M linears issue about 5-6 instructions per FP4 weight on sm_90 (decode, scale,
register moves, MMA), which at 26B-A4B's sizes costs more issue slots than the weights' bytes take to stream, so
the main loop's instruction count is a figure worth optimising before any GPU time is spent. This compiles the
26B-A4B shapes at a few token counts with `tuning.cross_compile.compile_for` (nothing runs), disassembles each
cubin with the cuobjdump Triton ships, finds the largest backward-branch loop and prints its size, the weights
each thread decodes per iteration, the most frequent opcodes, and the kernel's registers, spills, shared memory and
resident programs an SM.

  python3 scripts/cpu_sass_counts.py [--arch 9.0] [--m 1 16 64] [--halves] [--tile 128x128x64:8:3[:swap]] [--moe F=V,..]
  python3 scripts/cpu_sass_counts.py --attention [--arch 9.0]
(`--attention`: the decode and prefill attention kernels of both layer kinds over FP8 KV instead, as `nvfp4kit
bench compile` launches them: registers, spills and the key loop's size; session 30 found libdevice's sin/cos
half of the global layers' loop this way.)
(`--halves` forces `halves=True` on the tensor-core linears and the MoE: even/odd K halves, two MMAs; `--tile`
forces that tensor-core tile, warps and stages on the dense linears, e.g. at prefill sizes `--m 4096`, where they
otherwise expand and call cuBLAS.) Each row also counts the loop's Hopper MMAs and its waits for all of them
(`wgmma` = HGMMA, `sync` = WARPGROUP.DEPBAR.LE gsb0, 0x0): a wait after every MMA batch means the FP4 decode
of the next K step never overlaps the tensor cores (session 24, docs/benchmarks.md).
(`--moe` forces MoEConfig fields on the MoE tiles, e.g. `--moe gate_up_block_n=64,halves=1`.)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import tempfile

import torch

from nvfp4kit.kernels import fused_moe as fused_moe_module
from nvfp4kit.kernels import w4a16_linear as linear_module
from nvfp4kit.kernels.arch_limits import arch_limits
from nvfp4kit.kernels.configs import LinearConfig
from nvfp4kit.tuning import cross_compile
from nvfp4kit.tuning.cases import DENSE_SHAPES, MOE_SHAPE, random_nvfp4, random_routing

SKIP = ("align", "sum")  # bookkeeping kernels: no weight loop


def loop_code(sass: str) -> list[str]:
    """The instructions of the largest backward-branch loop of a `cuobjdump -sass` listing."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    loop = None
    for address, text in code:
        branch = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            if loop is None or address - start > loop[1] - loop[0]:
                loop = (start, address)
    return [] if loop is None else [text for address, text in code if loop[0] <= address <= loop[1]]


def opcode_counts(code: list[str]) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of a list of SASS instructions."""
    ops: collections.Counter = collections.Counter()
    for text in code:
        words = text.split()
        ops[words[1] if words[0].startswith("@") else words[0]] += 1
    return sum(ops.values()), ops


def main_loop(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the largest backward-branch loop of a `cuobjdump -sass` listing."""
    return opcode_counts(loop_code(sass))


def mma_waits(code: list[str]) -> int:
    """Waits for every outstanding Hopper MMA (`wgmma.wait_group 0`) among a loop's instructions."""
    return sum(1 for text in code if re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0$", text))


def sass_of(cubin: bytes) -> str:
    tool = cross_compile._cuobjdump()
    if tool is None:
        raise SystemExit("cuobjdump not found (Triton's bundled one or on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def weights_per_thread(name: str, constants: dict, warps: int) -> int | None:
    """FP4 weights one thread decodes per main-loop iteration (None where the kernel is not a weight loop)."""
    bn, bk = constants.get("BN"), constants.get("BK")
    if bn is None or bk is None:
        return None
    mats = 2 if "gate_up" in name else 1
    return mats * bn * bk // (32 * warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="9.0", help="compute capability to compile for (default 9.0)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--halves", action="store_true")
    ap.add_argument("--tile", help="BMxBNxBK:warps:stages[:swap], forced on the dense linears")
    ap.add_argument(
        "--moe", help="fields forced on the MoE tiles, e.g. swap_ab=1,gate_up_block_n=64,down_block_n=64"
    )
    ap.add_argument("--attention", action="store_true", help="the attention kernels instead (see above)")
    args = ap.parse_args()
    capability = tuple(int(v) for v in args.arch.split("."))
    if args.attention:
        attention_loops(capability, args.sms)
        return
    compiled = []
    record = cross_compile._record

    def keep(fn, kernel, kwargs):
        rec = record(fn, kernel, kwargs)
        compiled.append((fn.__name__, kernel.asm["cubin"], kernel.metadata.num_warps, dict(kwargs), rec))
        return rec

    cross_compile._record = keep
    if args.halves:
        pick_linear, pick_moe = linear_module.select_linear_config, fused_moe_module.select_moe_config
        linear_module.select_linear_config = lambda *a, **k: (
            lambda c: dataclasses.replace(c, halves=True) if c.kernel == "dot" else c
        )(pick_linear(*a, **k))
        fused_moe_module.select_moe_config = lambda *a, **k: dataclasses.replace(
            pick_moe(*a, **k), halves=True
        )
    if args.moe:
        moe_fields = {k: int(v) for k, v in (item.split("=") for item in args.moe.split(","))}
        pick = fused_moe_module.select_moe_config
        fused_moe_module.select_moe_config = lambda *a, **k: dataclasses.replace(pick(*a, **k), **moe_fields)
    e, top_k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
    gate_up = random_nvfp4(2 * i, h, experts=e, device="cpu")
    down = random_nvfp4(h, i, experts=e, device="cpu")
    linears = {
        op: random_nvfp4(n, k, device="cpu") for op, (n, k) in DENSE_SHAPES.items() if "global" not in op
    }
    print(f"sm_{args.arch.replace('.', '')}, main loop: instructions / weights a thread decodes an iteration")
    forced = _forced_tile(args.tile)
    for m in args.m:
        cases = {
            op: (
                lambda w=w, m=m, forced=forced: linear_module.w4a16_linear(
                    torch.randn(m, w.shape[1]).bfloat16(), w, config=forced
                )
            )
            for op, w in linears.items()
        }
        ids, route = random_routing(m, e, top_k, device="cpu")
        cases["moe"] = lambda m=m, ids=ids, route=route: fused_moe_module.fused_moe(
            torch.randn(m, h).bfloat16(), ids, route, gate_up, down
        )
        for label, run in cases.items():
            compiled.clear()
            with cross_compile.compile_for(capability, args.sms, zero_allocations=True):
                run()
            for name, cubin, warps, constants, rec in compiled:
                if any(s in name for s in SKIP):
                    continue
                code = loop_code(sass_of(cubin))  # parsed once for both counts
                n, ops = opcode_counts(code)
                waits = mma_waits(code)
                per = weights_per_thread(name, constants, warps)
                ratio = f"{n / per:.2f}/weight" if per and n else ""
                top = ", ".join(f"{k}:{v}" for k, v in ops.most_common(6))
                mma = sum(v for k, v in ops.items() if k.startswith("HGMMA"))
                sync = f" wgmma:{mma} sync:{waits}" if mma else ""
                regs = (
                    f" regs {rec.registers} spills {rec.spills} smem {rec.shared // 1024} KiB"
                    f" {rec.blocks_per_sm(arch_limits(capability))} blocks/SM"
                )
                print(
                    f"M={m:<3d} {label:18s} {name:28s} {n:4d} / {per or '-':>3} {ratio:12s} {top}{sync}{regs}",
                    flush=True,
                )


def attention_loops(capability: tuple[int, int], sms: int) -> None:
    """Registers, spills and key-loop instructions of 26B-A4B's attention launches (FP8 KV) on a card."""
    from nvfp4kit.bench.compile_check import attention_cases
    from nvfp4kit.config import load_preset

    compiled = []
    record = cross_compile._record

    def keep(fn, kernel, kwargs):
        compiled.append(kernel.asm["cubin"])
        return record(fn, kernel, kwargs)

    cross_compile._record = keep
    for case, _, launch in attention_cases(load_preset("gemma-4-26b-a4b"), ("fp8",)):
        compiled.clear()
        with cross_compile.compile_for(capability, sms, zero_allocations=True) as launched:
            launch()
        for cubin, kernel in zip(compiled, launched):
            n, ops = main_loop(sass_of(cubin))
            top = ", ".join(f"{k}:{v}" for k, v in ops.most_common(6))
            print(f"{case:36s} {kernel.kernel:28s} warps {kernel.num_warps} regs {kernel.registers} "
                  f"spills {kernel.spills} loop {n:5d}  {top}", flush=True)  # fmt: skip


def _forced_tile(spec: str | None) -> LinearConfig | None:
    """`--tile BMxBNxBK:warps:stages[:swap]` as a LinearConfig (PTX decoder), or None."""
    if spec is None:
        return None
    fields = spec.split(":")
    bm, bn, bk = (int(v) for v in fields[0].split("x"))
    return LinearConfig(
        "dot",
        bm,
        bn,
        bk,
        swap_ab=fields[3:] == ["swap"],
        num_warps=int(fields[1]),
        num_stages=int(fields[2]),
        decode="asm",
    )


if __name__ == "__main__":
    main()
