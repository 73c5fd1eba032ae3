"""`nvfp4kit bench compile`: the kernels a card gets, compiled for it on the CPU, launch there.

Runs the command in a fresh process (TRITON_INTERPRET=1, which the CPU tests set, would interpret instead of
compile) for an RTX 3090 target (99 KB of shared memory a block, the smallest of the cards we serve on).
"""

import json
import os
import subprocess
import sys

import pytest


def run_compiling(*args: str) -> subprocess.CompletedProcess:
    """`python args...` in a fresh process that compiles (TRITON_INTERPRET unset); skips without a ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas bundled with this triton build")
    return done


@pytest.fixture(scope="module")
def rtx3090_rows(tmp_path_factory) -> tuple[int, list[dict], str]:
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    done = run_compiling("-m", "nvfp4kit", "bench", "compile", "--gpu", "rtx3090", "--tokens", "1", "64",
                         "--kv-dtype", "fp8", "--json", str(out))  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    return done.returncode, json.loads(out.read_text())["rows"], done.stdout


def test_every_kernel_of_the_26b_shape_launches_on_an_rtx_3090(rtx3090_rows):
    code, rows, table = rtx3090_rows
    assert code == 0, [r for r in rows if not r["blocks_per_sm"] and not r.get("fell_back")]
    cases = {r["case"] for r in rows}
    assert {"prefill attention global d512 fp8", "decode attention sliding d256 fp8"} <= cases
    assert any(c.startswith("moe ") for c in cases) and any(c.startswith("linear ") for c in cases)
    # the engine's own steps (tiny widths) reach the small fused kernels and the FP8 lm_head too
    assert {"_qkv_norm_rope_kernel", "_ffn_tail_kernel", "_ffn_inputs_routed_kernel", "_w8a16_kernel"} <= {
        r["kernel"] for r in rows
    }
    assert all(r["registers"] and r["registers"] <= 255 for r in rows if r.get("kernel"))
    assert "| RTX 3090 |" in table


def test_prefill_attention_starts_on_tiles_an_rtx_3090_holds(rtx3090_rows):
    """The H200's first tiles need more than the 99 KB a block may have on an RTX 3090 (a failed launch, then
    the next tile) or spill kilobytes of registers: the card's first tile must fit and spill little."""
    _, rows, _ = rtx3090_rows
    for case in ("prefill attention global d512 fp8", "prefill attention sliding d256 fp8"):
        launches = [r for r in rows if r["case"] == case]
        assert len(launches) == 1, [(r["shared"], r["fell_back"]) for r in launches]
        assert launches[0]["shared"] <= 99 * 1024 and launches[0]["blocks_per_sm"] >= 1
        assert launches[0]["spills"] < 1024
    # decode at head dim 512: 8 warps there (4 spilled 656 B a thread on sm_86 with libdevice sin/cos)
    decode = [
        r
        for r in rows
        if r["case"] == "decode attention global d512 fp8" and r["kernel"] == "_paged_attention_kernel"
    ]
    assert decode and all(r["spills"] < 128 and r["num_warps"] == 8 for r in decode)


def test_compile_for_restores_the_process():
    """After the block, launches run again and CPU tensors are CPU tensors (no stand-in card left behind)."""
    code = (
        "from triton.runtime.jit import JITFunction\n"
        "from nvfp4kit.kernels import configs\n"
        "from nvfp4kit.tuning.cross_compile import compile_for\n"
        "run = JITFunction.run\n"
        "with compile_for((8, 9), 128):\n"
        "    assert configs.kernel_capability('cpu') == (8, 9) and configs.sm_count('cpu') == 128\n"
        "assert JITFunction.run is run and configs.kernel_capability('cpu') is None\n"
        "print('ok')\n"
    )
    done = run_compiling("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_decode_attention_keeps_three_blocks_an_sm_on_hopper_and_ampere():
    """26B-A4B's 4-warp decode tiles are capped at 168 registers: three blocks an SM. Uncapped, the global layer's
    took 177 (two blocks), and batch 96's programs ran in two waves instead of one (session 30, H100)."""
    code = (
        "import json\n"
        "from nvfp4kit.bench.compile_check import check_card\n"
        "from nvfp4kit.config import load_preset\n"
        "from nvfp4kit.plan.gpus import find_gpu\n"
        "rows = []\n"
        "for card in ('h100', 'a100'):\n"
        "    rows += check_card(find_gpu(card), load_preset('gemma-4-26b-a4b'), tokens=(), kv_dtypes=('fp8',),\n"
        "                       engine_steps=False)\n"
        "print(json.dumps([r for r in rows if r['case'].startswith('decode attention')]))\n"
    )
    done = run_compiling("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    tiles = [r for r in rows if r["kernel"] == "_paged_attention_kernel"]
    four_warps = [
        (r["gpu"], r["case"], r["registers"], r["blocks_per_sm"]) for r in tiles if r["num_warps"] == 4
    ]
    assert len(four_warps) >= 3, tiles  # both layers on the H100, the sliding one on the A100
    assert all(registers <= 168 and blocks >= 3 for *_, registers, blocks in four_warps), four_warps
