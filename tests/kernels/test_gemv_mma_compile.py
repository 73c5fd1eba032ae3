"""The fragment GEMV's point is a K loop without shared memory: its PTX takes MMA operands from the registers
each lane loaded, in 16-byte loads. Whether that holds depends on the layouts Triton picks for the loads (a load wider than 16
bytes a lane is spread over lanes, and the operands then go through shared memory every step), so this compiles
the kernel for sm_80 and sm_90 on the CPU (nothing runs; `tuning.cross_compile`) and reads its SASS: tensor-core
MMAs in the loops, no barrier or shared-memory access inside any loop (only the final sum over warps), for the
1-8 token form, the 16-token one and the expert-grouped MoE's two kernels."""

import os
import re
import subprocess
import sys

import pytest

from nvfp4kit.tuning import cross_compile

COMPILE = """
import sys, torch, triton
from nvfp4kit.kernels import gemv_mma as g
from nvfp4kit.tuning import cross_compile
from nvfp4kit.tuning.cases import random_nvfp4
kept = []
record = cross_compile._record
cross_compile._record = lambda fn, kernel, kwargs: (kept.append(kernel), record(fn, kernel, kwargs))[1]
arch, kw, unroll, m, nw = (int(v) for v in sys.argv[1:6])
w = random_nvfp4(256, 2112, device="cpu")
x = torch.randn(m, 2112).bfloat16()
packed, scale, s2 = w.kernel_operands()
out = torch.empty(m, 256, dtype=torch.bfloat16)
with cross_compile.compile_for((arch // 10, arch % 10), 132):
    g._gemv_mma_kernel[(32,)](
        x.view(torch.int32), packed.view(torch.int32), scale, s2, out, m, 256, 2112, x.stride(0) // 2,
        packed.stride(0) // 4, scale.stride(0), out.stride(0), KW=kw, NW=nw, UNROLL=unroll, ASM=2, T16=m > 8, PDL=0,
        num_warps=kw * nw, num_stages=1)
sys.stdout.buffer.write(kept[-1].asm["cubin"])
"""


GROUPED_MOE = """
import sys, torch
from nvfp4kit.kernels import moe_frag_grouped as mg
from nvfp4kit.tuning import cross_compile
from nvfp4kit.tuning.cases import random_nvfp4
kept = []
record = cross_compile._record
cross_compile._record = lambda fn, kernel, kwargs: (kept.append(kernel), record(fn, kernel, kwargs))[1]
arch, which, block, nt = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
T, H, I, K = 16, 2816, 704, 8
gu, dn = random_nvfp4(2 * I, H, experts=2, device="cpu"), random_nvfp4(H, I, experts=2, device="cpu")
x = torch.randn(T, H).bfloat16()
(gp, gs, g2), (dp, ds, d2) = gu.kernel_operands(), dn.kernel_operands()
pair_ids, blocks, route = torch.zeros(64, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), torch.ones(T * K)
act, part = torch.empty(T * K, I, dtype=torch.bfloat16), torch.empty(T * K, H)
with cross_compile.compile_for((arch // 10, arch % 10), 132):
    if which == "gate_up":
        mg._grouped_gate_up_kernel[(8, 44)](
            x.view(torch.int32), gp.view(torch.int32), gs, g2, d2, route, pair_ids, blocks, act, H, I, T * K,
            x.stride(0) // 2, gp.stride(0) // 4, gp.stride(1) // 4, gs.stride(0), gs.stride(1), act.stride(0),
            TOP_K=K, KW=2, NW=2, UNROLL=1, ASM=2, BLOCK=block, NT=nt, PDL=0, num_warps=4, num_stages=1)
    else:
        mg._grouped_down_kernel[(8, 88)](
            act.view(torch.int32), dp.view(torch.int32), ds, pair_ids, blocks, part, H, I, T * K,
            act.stride(0) // 2, dp.stride(0) // 4, dp.stride(1) // 4, ds.stride(0), ds.stride(1), part.stride(0),
            KW=1, NW=4, ASM=2, BLOCK=block, NT=nt, PDL=0, num_warps=4, num_stages=1)
sys.stdout.buffer.write(kept[-1].asm["cubin"])
"""


def loops_and_lines(sass: str) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for address, text in lines:
        # "BRA 0x..", "BRA `(.L_x_3) 0x..", and sm_120's "BRA.U !UP0, 0x.."
        branch = re.search(r"BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    return loops, lines


def _sass_of(script: str, args: list[str], tmp_path) -> str:
    """Compile with `script` (a cross-compile program that writes a cubin) on the CPU; its SASS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(done.stdout)
    return subprocess.run(
        [cross_compile._cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout


def assert_registers_only_loops(sass: str, min_mmas: int) -> None:
    """MMAs inside the K loops, and no barrier or shared-memory access there."""
    loops, lines = loops_and_lines(sass)
    assert loops, "no K loop found"
    in_loops = [text for address, text in lines if any(lo <= address <= hi for lo, hi in loops)]
    assert sum("HMMA.16816.F32.BF16" in text for text in in_loops) >= min_mmas
    shared = [text for text in in_loops if re.search(r"\b(BAR|LDS|STS|LDSM)\b", text)]
    assert not shared, shared[:5]
    # weights and activations in 16-byte loads (8-byte ones in masked tails): rows of 88 or 264 words (K 704, 2112)
    # once took four 32-bit loads a step (`gemv_mma.aligned4`)
    narrow = [text for text in in_loops if re.search(r"\bLDG\.E\s", text)]
    assert not narrow, narrow[:5]


@pytest.mark.skipif(cross_compile._cuobjdump() is None, reason="needs Triton's bundled cuobjdump")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(
    "k_warps,unroll,tokens,row_groups", [(4, 2, 1, 1), (1, 4, 1, 1), (4, 2, 16, 1), (2, 2, 4, 4)]
)
def test_the_k_loop_keeps_its_operands_in_registers(arch, k_warps, unroll, tokens, row_groups, tmp_path):
    args = [str(v) for v in (arch, k_warps, unroll, tokens, row_groups)]
    assert_registers_only_loops(_sass_of(COMPILE, args, tmp_path), 8 * unroll)


@pytest.mark.skipif(cross_compile._cuobjdump() is None, reason="needs Triton's bundled cuobjdump")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("which", ["gate_up", "down"])
@pytest.mark.parametrize("block,tiles", [(8, 1), (16, 1), (8, 2), (16, 4)])
def test_the_grouped_moe_loops_keep_their_operands_in_registers(arch, which, block, tiles, tmp_path):
    """Both block sizes, 2 or 4 MMA tiles a row group (`_tiles_loop`: NT times the MMAs on the same activations)."""
    args = [str(arch), which, str(block), str(tiles)]
    assert_registers_only_loops(_sass_of(GROUPED_MOE, args, tmp_path), 8 * tiles)


@pytest.mark.skipif(cross_compile._cuobjdump() is None, reason="needs Triton's bundled cuobjdump")
@pytest.mark.parametrize("arch", [86, 89, 120])  # RTX 3090, RTX 4090 / L40S, RTX 50xx: cards we never ran
@pytest.mark.parametrize("kernel", ["gemv", "grouped_gate_up", "grouped_down"])
def test_the_default_fragment_kernels_build_for_consumer_cards(arch, kernel, tmp_path):
    if kernel == "gemv":
        sass = _sass_of(COMPILE, [str(arch), "4", "2", "1", "1"], tmp_path)
    else:
        sass = _sass_of(GROUPED_MOE, [str(arch), kernel.removeprefix("grouped_"), "8", "1"], tmp_path)
    assert_registers_only_loops(sass, 8)
