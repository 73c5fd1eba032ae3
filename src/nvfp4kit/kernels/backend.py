"""The `triton` op backend: NVFP4 linears, the fused MoE and the fused element-wise regions as Triton kernels.

Dense (BF16) linear weights, such as the tied lm_head, go to cuBLAS through `torch.nn.functional.linear`.
Each region of `nvfp4kit.model.ops.FusedRegions` is one launch (norms.py, qkv_rope.py, geglu.py, router.py;
at decode sizes a MoE layer's FFN inputs and router together, ffn_router.py; where the fragment GEMV runs, the
dense MLP's gate_up projection with its GeGLU, gate_up_geglu.py).
Everything here is free of host syncs, so a model built on this backend can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvfp4kit.formats.fp8_rows import FP8RowTensor
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels import ffn_router, norms, router
from nvfp4kit.kernels.fused_moe import fused_moe
from nvfp4kit.kernels.gate_up_geglu import gate_up_geglu
from nvfp4kit.kernels.geglu import geglu
from nvfp4kit.kernels.logits import softcap_logits
from nvfp4kit.kernels.moe_dispatch import moe_shares_gpu
from nvfp4kit.kernels.qkv_rope import qkv_norm_rope
from nvfp4kit.kernels.router import route
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.kernels.w8a16_linear import w8a16_linear
from nvfp4kit.model.ops import Weight


class TritonBackend:
    name = "triton"

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        if isinstance(weight, NVFP4Tensor):
            return w4a16_linear(x, weight)
        if isinstance(weight, FP8RowTensor):
            return w8a16_linear(x, weight)
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))

    def moe(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up: Weight,
        down: Weight,
    ) -> torch.Tensor:
        if not isinstance(gate_up, NVFP4Tensor) and gate_up.dtype != x.dtype:
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
        return fused_moe(x, topk_ids, topk_weights, gate_up, down)

    @staticmethod
    def moe_shares_gpu(x: torch.Tensor, topk_ids: torch.Tensor, gate_up: Weight, down: Weight) -> bool:
        """Whether the dense MLP may run beside this MoE on a second stream (model/branches.py)."""
        return moe_shares_gpu(x.reshape(-1, x.shape[-1]), topk_ids.shape[-1], gate_up, down)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, *, eps: float) -> torch.Tensor:
        return norms.rms_norm(x, weight, eps=eps)

    ffn_inputs = staticmethod(norms.ffn_inputs)
    ffn_tail = staticmethod(norms.ffn_tail)
    qkv_norm_rope = staticmethod(qkv_norm_rope)
    stores_kv = True  # qkv_norm_rope takes a `kv_sink` (kernels/kv_write.KVSink) and stores K/V itself
    geglu = staticmethod(geglu)
    softcap_logits = staticmethod(softcap_logits)  # one pass over the vocabulary (logits.py)
    route = staticmethod(route)

    def gate_up_geglu(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        # one launch where the fragment GEMV takes this size (gate_up_geglu.py)
        if isinstance(weight, NVFP4Tensor):
            return gate_up_geglu(x, weight)
        return geglu(self.linear(x, weight))

    def route_tokens(
        self, z: torch.Tensor, weight: Weight, per_expert_scale: torch.Tensor, *, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if router.fuses(z, weight):  # decode sizes, dense weight: projection and top-k in one launch
            return router.fused_route(z, weight, per_expert_scale, top_k=top_k)
        return route(self.linear(z, weight), per_expert_scale, top_k=top_k)

    def ffn_inputs_routed(
        self,
        residual: torch.Tensor,
        attn_out: torch.Tensor,
        *,
        post_attn_norm: torch.Tensor,
        mlp_norm: torch.Tensor,
        experts_norm: torch.Tensor,
        router_scale: torch.Tensor,
        router_weight: Weight,
        per_expert_scale: torch.Tensor,
        top_k: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        norm_weights = dict(
            post_attn_norm=post_attn_norm,
            mlp_norm=mlp_norm,
            experts_norm=experts_norm,
            router_scale=router_scale,
        )
        if ffn_router.fuses(residual, router_weight):  # decode sizes, dense weight: one launch for both
            return ffn_router.ffn_inputs_routed(
                residual,
                attn_out,
                **norm_weights,
                router_weight=router_weight,
                per_expert_scale=per_expert_scale,
                top_k=top_k,
                eps=eps,
            )
        h, mlp_in, experts_in, router_in = norms.ffn_inputs(residual, attn_out, **norm_weights, eps=eps)
        weights, ids = self.route_tokens(router_in, router_weight, per_expert_scale, top_k=top_k)
        return h, mlp_in, experts_in, weights, ids
