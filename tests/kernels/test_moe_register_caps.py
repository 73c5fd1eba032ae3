"""Register caps on the MoE tiles (`MoEConfig.gate_up_max_registers` / `down_max_registers`, Triton's maxnreg).

A cap only matters if ptxas sees it: compiled for sm_90 on the CPU (no GPU), the capped gate_up kernel must use at
most the cap and fit more programs an SM than the uncapped one. Tuned tables name the caps, so bad values must be
refused when a table is read, not at the first launch.
"""

import json
import os
import subprocess
import sys

import pytest

from nvfp4kit.kernels.configs import MoEConfig, _from_dict

COMPILE = """
import json, torch
from nvfp4kit.kernels import fused_moe
from nvfp4kit.kernels.arch_limits import arch_limits
from nvfp4kit.kernels.configs import MoEConfig
from nvfp4kit.tuning import cross_compile
from nvfp4kit.tuning.cases import random_nvfp4, random_routing

gate_up = random_nvfp4(2 * 64, 256, experts=8, device="cpu")
down = random_nvfp4(256, 64, experts=8, device="cpu")
ids, route = random_routing(24, 8, 2, device="cpu")
rows = {}
for cap in (None, 96):
    cfg = MoEConfig(block_m=16, gate_up_block_n=32, gate_up_block_k=256, decode="asm", gate_up_max_registers=cap)
    with cross_compile.compile_for((9, 0), 132, zero_allocations=True) as compiled:
        fused_moe.fused_moe(torch.randn(24, 256).bfloat16(), ids, route, gate_up, down, config=cfg)
    k = next(c for c in compiled if c.kernel == "_moe_gate_up_kernel")
    rows[str(cap)] = [k.registers, k.blocks_per_sm(arch_limits((9, 0)))]
print(json.dumps(rows))
"""


def test_a_register_cap_reaches_ptxas_and_fits_more_programs_an_sm():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas bundled with this triton build")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    (free_regs, free_blocks), (capped_regs, capped_blocks) = rows["None"], rows["96"]
    assert capped_regs is not None and capped_regs <= 96 < free_regs, rows
    assert capped_blocks > free_blocks, rows


@pytest.mark.parametrize("cap", [0, 16, 256])
def test_a_tuned_table_with_an_impossible_cap_is_refused(cap):
    with pytest.raises(ValueError, match="register caps"):
        _from_dict(MoEConfig, {"gate_up_max_registers": cap})
    with pytest.raises(ValueError, match="register caps"):
        MoEConfig(down_max_registers=cap)
