"""The K-ordered PTX decode reads its four packed bytes as four K-consecutive bytes of one row, in every kernel.

(The decode is opt-in, NVFP4KIT_K_ORDER_DECODE=1; the compile runs in a subprocess with it set.)

`nvfp4_tile._DECODE_K_ORDER_PTX` is not elementwise: one instance turns 4 packed bytes into 8 weights that the
Triton code regroups in K order, which is right only if the 4 registers Triton hands an instance (`pack=4`) are
columns 4g..4g+3 of one row. That depends on the layout the compiler picks for the byte tile, so this compiles
every kernel that decodes (sm_80 and sm_90, on the CPU) and reads the layout of each decode's byte operand in
the TTGIR: the first two register bits must step K by 1 and 2, every other bit by a multiple of 4.
"""

import re
import sys

import pytest


def _bases(text: str, key: str) -> list[list[int]]:
    found = re.search(key + r" = (\[[^=]*?\]\]|\[\])", text)
    return eval(found.group(1)) if found else []  # noqa: S307 - a list of int lists from the compiler's text


def packs_are_k_consecutive(layout: str) -> bool:
    """Whether registers 4i..4i+3 of a layout are 4 consecutive, 4-aligned columns of one row."""
    if layout.startswith("#ttg.blocked"):
        per_thread = eval(re.search(r"sizePerThread = (\[[^\]]*\])", layout).group(1))  # noqa: S307
        order = eval(re.search(r"order = (\[[^\]]*\])", layout).group(1))  # noqa: S307
        return per_thread[-1] % 4 == 0 and order[0] == len(per_thread) - 1
    register = _bases(layout, "register")
    others = register[2:] + _bases(layout, "lane") + _bases(layout, "warp") + _bases(layout, "block")
    first_two = [b[:-1] == [0] * (len(b) - 1) and b[-1] == step for b, step in zip(register[:2], (1, 2))]
    return len(first_two) == 2 and all(first_two) and all(b[-1] % 4 == 0 for b in others)


def _check_all(arch: int) -> list[str]:
    import torch

    from nvfp4kit.kernels.configs import LinearConfig, MoEConfig
    from nvfp4kit.kernels.fused_moe import fused_moe
    from nvfp4kit.kernels.w4a16_linear import w4a16_linear
    from nvfp4kit.tuning import cross_compile
    from nvfp4kit.tuning.cases import random_nvfp4, random_routing

    irs = []
    record = cross_compile._record

    def keep(fn, kernel, kwargs):
        irs.append((fn.__name__, kernel.asm["ttgir"]))
        return record(fn, kernel, kwargs)

    cross_compile._record = keep
    weight = random_nvfp4(256, 512, device="cpu")
    gate_up, down = (
        random_nvfp4(192, 256, experts=8, device="cpu"),
        random_nvfp4(256, 96, experts=8, device="cpu"),
    )
    tiles = dict(gate_up_block_n=32, gate_up_block_k=128, down_block_n=64, down_block_k=32, decode="asm")
    linears = {  # the GEMV (fp32 products) keeps the elementwise decode: not checked
        "dot": LinearConfig("dot", 16, 16, 256, 1, num_warps=2, decode="asm"),
        "dot_narrow_k": LinearConfig("dot", 16, 16, 64, 1, decode="asm"),
        "dot_split_k32": LinearConfig("dot", 16, 32, 32, 2, decode="asm"),
        "dot_swap_k32": LinearConfig("dot", 16, 16, 32, 1, swap_ab=True, group_m=2, decode="asm"),
        "dot_wide": LinearConfig("dot", 16, 64, 256, 2, decode="asm"),
        "dot_swap": LinearConfig("dot", 64, 128, 64, 1, swap_ab=True, num_warps=8, decode="asm"),
        "dot_large": LinearConfig("dot", 128, 128, 64, 1, num_warps=8, decode="asm"),
    }
    runs = {
        name: (lambda c=c: w4a16_linear(torch.randn(4, 512).bfloat16(), weight, config=c))
        for name, c in linears.items()
    }
    ids, route = random_routing(4, 8, 2, device="cpu")
    for name, cfg in {"moe_split": MoEConfig(split=True, gate_up_split_k=2, **tiles),
                      "moe_sorted": MoEConfig(block_m=16, **tiles),
                      "moe_pair": MoEConfig(sorted=False, **tiles)}.items():  # fmt: skip
        runs[name] = lambda c=cfg: fused_moe(
            torch.randn(4, 256).bfloat16(), ids, route, gate_up, down, config=c
        )
    lines = []
    for name, run in runs.items():
        irs.clear()
        with cross_compile.compile_for((arch // 10, arch % 10), 132, zero_allocations=True):
            run()
        decodes = 0
        for kernel, ttgir in irs:
            layouts = dict(re.findall(r"^(#[a-z]+\d*) = (#ttg\.[a-z]+<.*>)$", ttgir, flags=re.M))
            for line in ttgir.splitlines():
                if "elementwise_inline_asm" in line and "0x0444" in line:
                    decodes += 1
                    byte_layout = re.search(r"tensor<[0-9x]+xi8, (#[a-z]+\d*)>", line).group(1)
                    ok = packs_are_k_consecutive(layouts[byte_layout])
                    lines.append(f"{'ok' if ok else 'BAD'} {name} {kernel} {layouts[byte_layout]}")
        if not decodes:
            lines.append(f"BAD {name}: no K-ordered decode compiled")
    return lines


def test_layout_reader_on_known_layouts():
    good = "#ttg.linear<{register = [[0, 1], [0, 2], [0, 16], [32, 0]], lane = [[0, 4], [1, 0]], warp = [[8, 0]], block = []}>"
    swapped = "#ttg.linear<{register = [[0, 1], [0, 16], [0, 2], [32, 0]], lane = [[0, 4], [1, 0]], warp = [], block = []}>"
    pairs = (
        "#ttg.linear<{register = [[0, 1], [1, 0], [0, 4]], lane = [[0, 2], [2, 0]], warp = [], block = []}>"
    )
    assert packs_are_k_consecutive(good)
    assert not packs_are_k_consecutive(swapped) and not packs_are_k_consecutive(pairs)
    assert packs_are_k_consecutive(
        "#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], order = [1, 0]}>"
    )
    assert not packs_are_k_consecutive(
        "#ttg.blocked<{sizePerThread = [1, 2], threadsPerWarp = [4, 8], order = [1, 0]}>"
    )


@pytest.mark.parametrize("arch", [80, 90])
def test_k_ordered_decode_gets_k_consecutive_bytes(arch):
    from .helpers import compile_in_subprocess  # here: the module also runs as a script, outside the package

    lines = compile_in_subprocess(__file__, arch).strip().split("\n")
    assert lines and all(line.startswith("ok ") for line in lines), "\n".join(lines)


if __name__ == "__main__":
    import os

    os.environ["NVFP4KIT_K_ORDER_DECODE"] = "1"  # read when nvfp4_tile is imported, inside _check_all
    print("\n".join(_check_all(int(sys.argv[1]))))
