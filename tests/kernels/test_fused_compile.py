"""The fused-region kernels compile (Triton front end, PTX, ptxas) for Ampere and Hopper targets, without a GPU.

The interpreter runs kernels as Python, so it cannot see code the compiler rejects (branch-local values,
mixed types across runtime branches); this compiles each kernel at the 26B-A4B block sizes for sm_80 and sm_90.
"""

import sys

import pytest
import triton

# Triton's compiler internals move between releases: skip (not fail) where this Triton lays them out otherwise
compiler = pytest.importorskip("triton.compiler")
GPUTarget = pytest.importorskip("triton.backends.compiler").GPUTarget

from nvfp4kit.kernels import (  # noqa: E402
    ffn_router,
    geglu,
    norms,
    paged_attention,
    prefill_attention,
    qkv_rope,
    rotated_keys,
    router,
)

ROWS = dict(n="i32", stride_x="i32", stride_res="i32", stride_out="i32", stride_h="i32", stride_mlp="i32",
            stride_experts="i32", eps="fp32", router_factor="fp32")  # fmt: skip
ATTN_PTRS = {"k_ptr": "*u8", "v_ptr": "*u8", "inv_freq_ptr": "*fp32", **{
    f"{n}_ptr": "*i32" for n in ("limit", "item_seq", "item_q0", "seq_start", "seq_len", "seq_offset",
                                 "block_table", "ring", "counter")}}  # fmt: skip
ATTN_SCALARS = {"k_factor": "fp32", "v_factor": "fp32"}  # the strides and sizes: i32 (below)
ATTN_COMMON = dict(BLOCK_N=64, KV_FORMAT=1, NATIVE_FP8=False, COMPUTE=2, PRECISION="ieee")
KERNELS = {  # name: (kernel, warps, pointer types (default *bf16), other types, constexprs)
    "rms_norm": (norms._rms_norm_kernel, 8, {}, ROWS, dict(HAS_WEIGHT=True, BLOCK=4096)),
    "rms_norm_plain": (norms._rms_norm_kernel, 1, {}, ROWS, dict(HAS_WEIGHT=False, BLOCK=64)),
    "ffn_inputs": (norms._ffn_inputs_kernel, 8, {}, ROWS, dict(HAS_EXPERTS=True, BLOCK=4096)),
    "ffn_inputs_dense": (norms._ffn_inputs_kernel, 16, {}, ROWS, dict(HAS_EXPERTS=False, BLOCK=8192)),
    "ffn_tail": (norms._ffn_tail_kernel, 8, {}, ROWS, dict(HAS_EXPERTS=True, HAS_SCALAR=True, HAS_NEXT=True,
                                                         BLOCK=4096)),
    "ffn_tail_dense": (norms._ffn_tail_kernel, 16, {}, ROWS, dict(HAS_EXPERTS=False, HAS_SCALAR=False, HAS_NEXT=False,
                                                               BLOCK=8192)),
    # with the KV write fused in, into an FP8 E4M3 pool (read as bytes)
    "qkv_norm_rope": (qkv_rope._qkv_norm_rope_kernel, 2, {"pos_ptr": "*i64", "freq_ptr": "*fp32", "slot_ptr": "*i64",
                                                          "k_pool": "*u8", "v_pool": "*u8"},
                      dict(stride_qkv="i32", num_heads="i32", num_kv_heads="i32", v_col="i32", eps="fp32",
                           HALF="i32", k_scale="fp32", v_scale="fp32", stride_ks="i32", stride_kh="i32",
                           stride_vs="i32", stride_vh="i32"),
                      dict(BLOCK_HALF=128, SINK=True, K_POOL=True, FORMAT=1, MAN=3, BIAS=7, MAX_VALUE=448.0,
                           MIN_NORMAL=2.0**-6, SUB_SCALE=2.0**9)),
    "route": (router._route_kernel, 1, {"weights_ptr": "*fp32", "ids_ptr": "*i64"},
              dict(num_experts="i32", stride_logits="i32"), dict(TOP_K=8, BLOCK_E=128)),
    "route_fused": (router._fused_route_kernel, 4, {"scale_ptr": "*fp32", "logits_ptr": "*fp32", "counter_ptr": "*i32",
                                                    "weights_ptr": "*fp32", "ids_ptr": "*i64"},
                    dict(num_tokens="i32", num_experts="i32", hidden="i32", stride_z="i32", stride_w="i32"),
                    dict(TOP_K=8, BLOCK_T=1, EXPERTS_PER_PROGRAM=2, BLOCK_K=512, BLOCK_E=128, ROUND_BF16=True,
                         CAST_WEIGHT=False)),
    # the FFN inputs and the router in one launch, at 26B-A4B's decode tile (4 tokens, one expert a program)
    "ffn_inputs_routed": (ffn_router._ffn_inputs_routed_kernel, 8, {"scale_ptr": "*fp32", "logits_ptr": "*fp32",
                                                                    "counter_ptr": "*i32", "weights_ptr": "*fp32",
                                                                    "ids_ptr": "*i64"},
                          dict(ROWS, num_tokens="i32", num_experts="i32", stride_w="i32"),
                          dict(TOP_K=8, BLOCK_T=4, EXPERTS_PER_PROGRAM=1, BLOCK=4096, BLOCK_K=512, BLOCK_E=128,
                               ROUND_BF16=True, CAST_WEIGHT=False)),
    "geglu": (geglu._geglu_kernel, 4, {}, dict(inter="i32", stride_in="i32"), dict(BLOCK=1024)),
    # prefill attention at 26B-A4B's layer shapes and default tiles, FP8 KV read through integer bits (any SM)
    "prefill_attention_global": (prefill_attention._prefill_attention_kernel, 8, ATTN_PTRS, ATTN_SCALARS,
                                 dict(ATTN_COMMON, GROUP=8, GROUP_P2=8, BLOCK_Q=8, D=512, DV=512, DV_SPLITS=1, ROT=64,
                                      RING=False, SLIDING=False, DERIVE_K=True, PREROTATED=False, BIDIR=False)),
    "prefill_attention_global_prerotated": (prefill_attention._prefill_attention_kernel, 8,
                                            {**ATTN_PTRS, "rot_ptr": "*fp16", "rot_first_ptr": "*i32"}, ATTN_SCALARS,
                                            dict(ATTN_COMMON, GROUP=8, GROUP_P2=8, BLOCK_Q=8, D=512, DV=512,
                                                 DV_SPLITS=1, ROT=64, RING=False, SLIDING=False, DERIVE_K=True,
                                                 PREROTATED=True, BIDIR=False)),
    "rotate_keys": (rotated_keys._rotate_keys_kernel, 4,
                    {"v_ptr": "*u8", "out_ptr": "*fp16", "inv_freq_ptr": "*fp32", "first_row_ptr": "*i32",
                     "seq_start_ptr": "*i32", "seq_len_ptr": "*i32", "block_table_ptr": "*i32"},
                    {s: "i32" for s in ("stride_vs", "stride_vh", "stride_os", "stride_oh", "stride_bt", "block_size")},
                    dict(D=512, ROT=64, BLOCK_N=64, KV_FORMAT=1, NATIVE_FP8=False)),
    "prefill_attention_sliding_images": (prefill_attention._prefill_attention_kernel, 8, ATTN_PTRS, ATTN_SCALARS,
                                         dict(ATTN_COMMON, GROUP=2, GROUP_P2=2, BLOCK_Q=64, D=256, DV=256, DV_SPLITS=1, ROT=1,
                                              RING=True, SLIDING=True, DERIVE_K=False, PREROTATED=False, BIDIR=True)),
    "paged_attention_global_decode": (paged_attention._paged_attention_kernel, 4,
                                      {**ATTN_PTRS, "part_acc_ptr": "*fp32", "part_lse_ptr": "*fp32"}, ATTN_SCALARS,
                                      dict(ATTN_COMMON, BLOCK_N=16, GROUP=8, GROUP_P2=8, BLOCK_Q=1, BLOCK_M=16, D=512,
                                           ROT=64, RING=False, SLIDING=False, DERIVE_K=True, SPLIT=True)),
}  # fmt: skip
ATTENTION_KERNELS = (prefill_attention._prefill_attention_kernel, paged_attention._paged_attention_kernel)


def _compile(name: str, arch: int):
    fn, warps, pointers, scalars, constants = KERNELS[name]
    constants = {**constants, "PDL": 2 if arch >= 90 else 0}  # griddepcontrol (kernels/launch.py) from SM90
    names = fn.arg_names

    def kind(arg: str) -> str:
        if arg in constants:
            return "constexpr"
        found = pointers.get(arg) or scalars.get(arg) or ("*bf16" if arg.endswith("_ptr") else None)
        return found or ("i32" if fn in ATTENTION_KERNELS else "?")

    signature = {arg: kind(arg) for arg in names}
    assert "?" not in signature.values(), f"{name}: untyped arguments in {signature}"
    src = compiler.ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


@pytest.mark.parametrize("arch", [80, 90])
def test_fused_kernels_compile_for_target(arch):
    from .helpers import compile_in_subprocess  # here: the module also runs as a script, outside the package

    stdout = compile_in_subprocess(__file__, arch)
    assert sorted(stdout.split()) == sorted(f"ok:{name}" for name in KERNELS), stdout


if __name__ == "__main__":
    for kernel_name in KERNELS:
        ptx = _compile(kernel_name, int(sys.argv[1])).asm["ptx"]
        pdl_ok = ("griddepcontrol.wait" in ptx) == (int(sys.argv[1]) >= 90)
        print(f"ok:{kernel_name}" if f".target sm_{sys.argv[1]}" in ptx and pdl_ok else f"bad:{kernel_name}")
