"""Memory and speed planning for Gemma 4 on a GPU: pure arithmetic on a config or safetensors headers.

The engine calls `kv_bytes_per_token` and `plan_pools` at start-up with the free memory it measured; the
`nvfp4kit plan` command shows everything through `build_plan` / `format_plan`.
"""

from nvfp4kit.formats.components import component_of
from nvfp4kit.formats.safetensors_io import read_header
from nvfp4kit.plan.checkpoint import weights_from_checkpoint
from nvfp4kit.plan.gpus import GPUS, GpuSpec, find_gpu
from nvfp4kit.plan.kv import KV_DTYPE_BYTES, KVBytesPerToken, kv_bytes_per_token
from nvfp4kit.plan.pools import PoolPlan, RuntimeReserve, plan_pools, runtime_reserve
from nvfp4kit.plan.report import build_plan, resolve_model
from nvfp4kit.plan.roofline import DecodeStep, decode_step, expected_distinct_experts
from nvfp4kit.plan.sglang import SGLangPools, sglang_pools, sglang_pools_for
from nvfp4kit.plan.text import format_plan
from nvfp4kit.plan.units import parse_bytes
from nvfp4kit.plan.weights import (
    RECIPES,
    ParamCounts,
    WeightBreakdown,
    nvfp4_linear_bytes,
    parameter_counts,
    weights_from_config,
)

__all__ = [
    "GPUS", "KV_DTYPE_BYTES", "RECIPES", "DecodeStep", "GpuSpec", "KVBytesPerToken", "ParamCounts", "PoolPlan",
    "RuntimeReserve", "SGLangPools", "WeightBreakdown", "build_plan", "component_of", "decode_step",
    "expected_distinct_experts", "find_gpu", "format_plan", "kv_bytes_per_token", "nvfp4_linear_bytes",
    "parameter_counts", "parse_bytes", "plan_pools", "read_header", "resolve_model", "runtime_reserve",
    "sglang_pools", "sglang_pools_for", "weights_from_checkpoint", "weights_from_config",
]  # fmt: skip
