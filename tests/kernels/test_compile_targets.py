"""Every kernel compiles (Triton front end, PTX, ptxas) for Ampere, Ada and Hopper targets, without a GPU.

This catches what the CPU interpreter cannot: code the compiler rejects, inline PTX that ptxas rejects, and
Hopper-only instructions in the generic path (ptxas for sm_80 refuses them).
"""

import importlib
import sys

import pytest
import triton

# Triton's compiler internals move between releases: skip (not fail) where this Triton lays them out otherwise
compiler = pytest.importorskip("triton.compiler")
GPUTarget = pytest.importorskip("triton.backends.compiler").GPUTarget

from nvfp4kit.kernels.logits import _greedy_merge_kernel, _greedy_split_kernel, _softcap_kernel  # noqa: E402
from nvfp4kit.kernels.moe_align import _moe_align_kernel  # noqa: E402
from nvfp4kit.kernels.moe_sum import _moe_sum_kernel  # noqa: E402
from nvfp4kit.kernels.paged_attention import _merge_splits_kernel, _paged_attention_kernel  # noqa: E402
from nvfp4kit.kernels.w4a16_linear import _w4a16_dot_kernel, _w4a16_gemv_kernel  # noqa: E402

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU

moe = importlib.import_module("nvfp4kit.kernels.fused_moe")
moe_split = importlib.import_module("nvfp4kit.kernels.moe_split")

LINEAR_PTRS = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "s2_ptr": "*fp32", "out_ptr": "*bf16",
               "ws_ptr": "*fp32", "counter_ptr": "*i32"}  # fmt: skip
MOE_PTRS = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "s2_ptr": "*fp32", "act_ptr": "*bf16",
            "pair_ids_ptr": "*i32", "block_expert_ptr": "*i32", "topk_ids_ptr": "*i64", "topk_w_ptr": "*fp32",
            "out_ptr": "*bf16", "part_ptr": "*bf16", "ids_ptr": "*i64", "scratch_ptr": "*i32", "ws_ptr": "*fp32",
            "counter_ptr": "*i32"}  # fmt: skip
# decode attention over an FP8 e4m3 pool read as bytes (the integer decode every target has), K derived from V
ATTN_PTRS = {"q_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_lse_ptr": "*fp32", "k_ptr": "*u8", "v_ptr": "*u8",
             "k_factor": "fp32", "v_factor": "fp32", "knorm_ptr": "*bf16", "inv_freq_ptr": "*fp32",
             "item_seq_ptr": "*i32", "item_q0_ptr": "*i32", "seq_start_ptr": "*i32", "seq_len_ptr": "*i32",
             "seq_offset_ptr": "*i32", "block_table_ptr": "*i32", "ring_ptr": "*i32"}  # fmt: skip
ATTN = dict(GROUP=8, GROUP_P2=8, BLOCK_Q=1, BLOCK_M=16, BLOCK_N=16, D=512, ROT=128, RING=False, SLIDING=False,
            DERIVE_K=True, KV_FORMAT=1, NATIVE_FP8=False, COMPUTE=1, SPLIT=True, PRECISION=None)  # fmt: skip
# the vocabulary-wide kernels after the lm_head (kernels/logits.py)
LOGITS_PTRS = {"in_ptr": "*bf16", "out_ptr": "*fp32", "cap": "fp32", "logits_ptr": "*fp32", "part_ptr": "*fp32",
               "index_ptr": "*i32", "table_ptr": "*fp64"}  # fmt: skip
COMMON = dict(EVEN_K=False, INTERPRET=False, HALVES=False)
KERNELS = {
    "dot_small_asm": (_w4a16_dot_kernel, 4, dict(BM=16, BN=64, BK=256, SPLIT_K=2, GROUP_M=8, SWAP_AB=False, ASM=True)),
    "dot_large_bits": (_w4a16_dot_kernel, 8, dict(BM=128, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, SWAP_AB=False, ASM=False)),
    "dot_swap_asm": (_w4a16_dot_kernel, 8, dict(BM=64, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, SWAP_AB=True, ASM=True)),
    # the two-op scale decode (ASM=2) and the nibble halves
    "dot_small_asm2_halves": (_w4a16_dot_kernel, 4, dict(BM=16, BN=64, BK=256, SPLIT_K=2, GROUP_M=8, SWAP_AB=False, ASM=2, HALVES=True)),
    "gate_up_split_asm2": (moe_split._moe_gate_up_split_kernel, 4, dict(TOP_K=8, BN=32, BK=256, SPLIT_K=2, NVFP4=True, ASM=2)),
    "down_split_asm2_halves": (moe_split._moe_down_split_kernel, 4, dict(TOP_K=8, BN=64, BK=128, SPLIT_K=2, NVFP4=True, ASM=2, HALVES=True)),
    "gemv_asm": (_w4a16_gemv_kernel, 4, dict(BM=2, BN=32, BK=256, SPLIT_K=2, ASM=True, EVEN_K=True)),
    "gate_up_pair_asm": (moe._moe_gate_up_kernel, 4, dict(TOP_K=8, BM=16, BN=32, BK=128, SORTED=False, NVFP4=True, ASM=True)),
    "gate_up_sorted_dense": (moe._moe_gate_up_kernel, 4, dict(TOP_K=8, BM=32, BN=64, BK=64, SORTED=True, NVFP4=False, ASM=False)),
    "down_sorted_asm": (moe._moe_down_kernel, 4, dict(BM=16, BN=64, BK=64, SORTED=True, NVFP4=True, ASM=True)),
    "gate_up_sorted_halves_asm": (moe._moe_gate_up_kernel, 4, dict(TOP_K=8, BM=16, BN=64, BK=128, SORTED=True, NVFP4=True, ASM=True, HALVES=True)),
    "down_sorted_halves_dense": (moe._moe_down_kernel, 4, dict(BM=16, BN=64, BK=64, SORTED=True, NVFP4=False, ASM=False, HALVES=True)),
    "down_token_asm": (moe._moe_down_token_kernel, 4, dict(TOP_K=8, BM=16, BN=32, BK=128, NVFP4=True, ASM=True)),
    "sum": (_moe_sum_kernel, 4, dict(TOP_K=8, BLOCK=1024)),
    "align": (_moe_align_kernel, 8, dict(E_PAD=128, BM=16, CHUNK=1024, BLOCK_CHUNK=64)),
    "decode_attention_split": (_paged_attention_kernel, 4, ATTN),
    # a sliding layer's decode over a native FP8 ring (SM89+: hardware FP8 conversion), as 26B-A4B serves it
    "decode_attention_ring_fp8_sm89": (_paged_attention_kernel, 4, {**ATTN, "GROUP": 2, "GROUP_P2": 2, "D": 256,
        "BLOCK_N": 32, "RING": True, "SLIDING": True, "DERIVE_K": False, "NATIVE_FP8": True, "COMPUTE": 2,
        "SPLIT": False}),
    "merge_splits_sliding": (_merge_splits_kernel, 4, dict(CHUNK=8, D=256, BLOCK_N=32, SLIDING=True)),
    "softcap": (_softcap_kernel, 8, dict(CAPPED=True, BLOCK=2048)),
    "greedy_split": (_greedy_split_kernel, 4, dict(SPLITS=32, BLOCK=1024)),
    "greedy_merge": (_greedy_merge_kernel, 1, dict(SPLITS=32)),
}  # fmt: skip
LOGITS_KERNELS = {_softcap_kernel, _greedy_split_kernel, _greedy_merge_kernel}


def _compile(fn, constants: dict, arch: int, warps: int):
    names = fn.arg_names
    constants = {**{k: v for k, v in COMMON.items() if k in names}, **constants}
    ptrs = {**LINEAR_PTRS, **MOE_PTRS, **ATTN_PTRS, **(LOGITS_PTRS if fn in LOGITS_KERNELS else {})}
    if constants.get("NATIVE_FP8"):
        ptrs = {**ptrs, "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"}
    if "NVFP4" in constants and not constants["NVFP4"]:
        ptrs = {**ptrs, "w_ptr": "*bf16", "s_ptr": "*bf16", "s2_ptr": "*bf16"}
    signature = {n: "constexpr" if n in constants else ptrs.get(n, "i32") for n in names}
    src = compiler.ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3}
    )


def _check_all(arch: int) -> list[str]:
    lines = []
    pdl = 2 if arch >= 90 else 0  # programmatic dependent launch (kernels/launch.py) exists from SM90
    for name, (fn, warps, constants) in sorted(KERNELS.items()):
        if name.endswith("_sm89") and arch < 89:
            lines.append(f"ok {name} sm_{arch} (not built below sm_89)")
            continue
        ptx = _compile(fn, {**constants, "PDL": pdl}, arch, warps).asm["ptx"]
        hopper_only = [op for op in ("wgmma", "setmaxnreg", "cp.async.bulk", "griddepcontrol") if op in ptx]
        ok = f".target sm_{arch}" in ptx and (arch >= 90 or not hopper_only)
        ok = ok and (arch < 90 or "griddepcontrol.wait" in ptx)
        lines.append(f"{'ok' if ok else 'BAD'} {name} sm_{arch} {hopper_only}")
    return lines


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_target(arch):
    from .helpers import compile_in_subprocess  # here: the module also runs as a script, outside the package

    stdout = compile_in_subprocess(__file__, arch)
    lines = stdout.split("\n")
    assert sum(line.startswith("ok ") for line in lines) == len(KERNELS), stdout


if __name__ == "__main__":
    print("\n".join(_check_all(int(sys.argv[1]))))
