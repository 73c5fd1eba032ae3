"""Triton kernels for W4A16 NVFP4 (dense linear, fused GELU MoE) behind the `triton` op backend.

Importing this package registers the backend when Triton is installed; without Triton the package still
imports and the model keeps the `torch` backend.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised only where triton is missing
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

if TRITON_AVAILABLE:
    from nvfp4kit.kernels.backend import TritonBackend
    from nvfp4kit.kernels.configs import LinearConfig, MoEConfig
    from nvfp4kit.kernels.fused_moe import fused_moe
    from nvfp4kit.kernels.moe_align import moe_align
    from nvfp4kit.kernels.w4a16_linear import w4a16_linear
    from nvfp4kit.model.ops import register_backend

    register_backend("triton", TritonBackend)

    __all__ = ["LinearConfig", "MoEConfig", "TritonBackend", "fused_moe", "moe_align", "w4a16_linear"]
