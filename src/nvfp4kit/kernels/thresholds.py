"""Sizes at which kernels switch to paths that allocate a scratch buffer (no Triton import).

The kernels read these to pick their path; the memory planner (`nvfp4kit.plan.pools`) reads them to reserve the
scratch those paths allocate, so `nvfp4kit plan` works on a machine without Triton.
"""

# tokens from which a linear's default path expands the weight and calls cuBLAS (kernels/w4a16_linear.py): on
# the H200 at M = 512 it beat the best Triton tile for all six 26B-A4B linears by 1.2-2.2x (docs/benchmarks.md)
DEQUANT_MIN_M = 512

# tokens from which a linear whose weight has a kept BF16 copy (`engine.linear_copies`, `--linear-copies`) reads
# that copy through cuBLAS instead of running a W4A16 kernel. H100, session 32 (`bench kernels`): at 32 tokens the
# four linears of a sliding layer take 50.5 us either way and `bench engine` batch 32 lost 3% with the copies; at
# 48 cuBLAS takes 51.7 us against 65.2, at 96 61.3 against 87.6 (batch 96 +5.7%)
LINEAR_COPY_MIN_M = 48

# tokens from which `fused_moe` expands all experts and runs grouped GEMMs (kernels/moe_prefill.py, where
# `grouped_mm_available`). H200, 26B-A4B MoE: 1.93 ms vs 1.97 (the best Triton tiles) at 4096 tokens, 2.75 vs
# 3.51 at 8192, but 1.70 vs 1.11 at 2048: the expansion of all 128 experts costs a fixed 0.72 ms
MOE_PREFILL_MIN_TOKENS = 4096

# keys (a step's prefill sequences together) from which derived K's rotated columns are written once per layer
# and step into a scratch (kernels/rotated_keys.py); the allocator's margin (plan.pools.MIN_MARGIN) holds up to
# PREROTATE_MARGIN_BYTES of it (128K keys of 26B-A4B), the plan reserves what longer contexts need beyond that
PREROTATE_MIN_KEYS = 8192
PREROTATE_MARGIN_BYTES = 64 * 2**20
