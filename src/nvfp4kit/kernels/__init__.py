"""Triton kernels: NVFP4 W4A16 and FP8 W8A16 linears, the fused GELU MoE, paged attention, KV writes and
the fused element-wise regions, each with a torch reference in its tests.

`backend.py` puts them behind the `triton` op backend, which `nvfp4kit.model.ops.BACKENDS` names and imports on
first use. Import the modules themselves (`nvfp4kit.kernels.w4a16_linear`, ...): this package imports nothing,
so `attention_metadata` (the types the engine builds for `paged_attention`) imports without Triton.
"""
