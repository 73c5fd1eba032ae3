"""`nvfp4kit bench compile`: the kernels a card gets, compiled for it on the CPU, launch there.

Runs the command in a fresh process (TRITON_INTERPRET=1, which the CPU tests set, would interpret instead of
compile) for an RTX 3090 target (99 KB of shared memory a block, the smallest of the cards we serve on).
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def rtx3090_rows(tmp_path_factory) -> tuple[int, list[dict], str]:
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "nvfp4kit", "bench", "compile", "--gpu", "rtx3090", "--tokens", "1", "64",
           "--kv-dtype", "fp8", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas bundled with this triton build")
    assert out.exists(), done.stderr[-3000:]
    return done.returncode, json.loads(out.read_text())["rows"], done.stdout


def test_every_kernel_of_the_26b_shape_launches_on_an_rtx_3090(rtx3090_rows):
    code, rows, table = rtx3090_rows
    assert code == 0, [r for r in rows if not r["blocks_per_sm"] and not r.get("fell_back")]
    cases = {r["case"] for r in rows}
    assert {"prefill attention global d512 fp8", "decode attention sliding d256 fp8"} <= cases
    assert any(c.startswith("moe ") for c in cases) and any(c.startswith("linear ") for c in cases)
    assert all(r["registers"] and r["registers"] <= 255 for r in rows if r.get("kernel"))
    assert "| RTX 3090 |" in table


def test_prefill_attention_falls_back_to_tiles_that_fit_99_kb(rtx3090_rows):
    """The H200's first-choice tiles need more shared memory than an RTX 3090 block may have: the kernel must
    move on to smaller ones, as it does on the card (OutOfResources at launch), and end on one that fits."""
    _, rows, _ = rtx3090_rows
    launches = [r for r in rows if r["case"] == "prefill attention global d512 fp8"]
    assert len(launches) >= 2 and launches[0]["shared"] > 99 * 1024 and launches[0]["fell_back"]
    assert launches[-1]["shared"] <= 99 * 1024 and launches[-1]["blocks_per_sm"] >= 1


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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
