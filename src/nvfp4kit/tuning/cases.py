"""Benchmark cases for the W4A16 kernels at Gemma 4 26B-A4B shapes: inputs, the op, its byte and FLOP counts.

Weights are random NVFP4 built directly on the GPU (random nibbles, E4M3 block scales drawn from the normal
range, a small fp32 global scale), never loaded from a checkpoint. Each case keeps several copies of its
inputs (`sets`) so timed loops stream weights from device memory instead of the L2 cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import LinearConfig, MoEConfig
from nvfp4kit.model.ops import TorchBackend, gelu_tanh

HIDDEN = 2816
# op name -> (N, K) of the 26B-A4B linears (fused projections concatenated along N)
DENSE_SHAPES: dict[str, tuple[int, int]] = {
    "dense_qkv_sliding": (4096 + 2048 + 2048, HIDDEN),
    "dense_qk_global": (8192 + 1024, HIDDEN),
    "dense_o_sliding": (HIDDEN, 4096),
    "dense_o_global": (HIDDEN, 8192),
    "dense_gate_up": (2 * 2112, HIDDEN),
    "dense_down": (HIDDEN, 2112),
}
MOE_SHAPE = {"experts": 128, "top_k": 8, "hidden": HIDDEN, "inter": 704}
LM_HEAD_SHAPE = (262144, HIDDEN)


def random_nvfp4(n: int, k: int, *, experts: int | None = None, device="cuda", seed: int = 0) -> NVFP4Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    lead = () if experts is None else (experts,)
    packed = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=device, generator=gen)
    # E4M3 bytes 0x20..0x7E: 2^-4 .. 448, the range real checkpoints use (the tensor max block gets 448)
    scale = torch.randint(0x20, 0x7F, (*lead, n, k // 16), dtype=torch.uint8, device=device, generator=gen)
    scale_2 = torch.rand(lead, device=device, generator=gen) * 1e-4 + 1e-5
    return NVFP4Tensor(packed, scale.view(torch.float8_e4m3fn), scale_2.float())


def nvfp4_bytes(weight: NVFP4Tensor) -> int:
    return weight.packed.numel() + weight.scale.numel() + 4 * weight.scale_2.numel()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@dataclass
class DenseCase:
    """y = x @ W^T for one linear shape and M, with rotated input copies."""

    op: str
    n: int
    k: int
    m: int
    weights: list[NVFP4Tensor]
    bf16_weights: list[torch.Tensor]
    xs: list[torch.Tensor]

    @classmethod
    def build(cls, op: str, n: int, k: int, m: int, *, sets: int, bf16_sets: int, device="cuda") -> DenseCase:
        weights = [random_nvfp4(n, k, device=device, seed=s) for s in range(sets)]
        bf16 = [weights[s % sets].dequantize(torch.bfloat16) for s in range(bf16_sets)]
        xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in range(max(sets, bf16_sets))]
        return cls(op, n, k, m, weights, bf16, xs)

    def runs(self, config: LinearConfig) -> bool:
        """Every linear config runs as named (`w4a16_linear` takes any of them)."""
        return True

    def call(self, config: LinearConfig | None):
        from nvfp4kit.kernels.w4a16_linear import w4a16_linear  # triton: imported when a GPU case runs

        return lambda i: w4a16_linear(
            self.xs[i % len(self.xs)], self.weights[i % len(self.weights)], config=config
        )

    def bf16_call(self):
        return lambda i: F.linear(self.xs[i % len(self.xs)], self.bf16_weights[i % len(self.bf16_weights)])

    def error(self, config: LinearConfig | None) -> float:
        ref = self.xs[0].float() @ self.weights[0].dequantize(torch.float32).T
        return rel_error(self.call(config)(0), ref)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def bytes(self) -> int:
        return nvfp4_bytes(self.weights[0]) + 2 * self.m * (self.k + self.n)

    @property
    def bf16_bytes(self) -> int:
        return 2 * (self.n * self.k + self.m * (self.k + self.n))


def random_routing(tokens: int, experts: int, top_k: int, *, device="cuda", seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    probs, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return ids, (probs / probs.sum(-1, keepdim=True)).float()


@dataclass
class MoECase:
    """One MoE layer (default: 26B-A4B's 128 experts, top-8) for M tokens, with rotated routings and weight copies."""

    m: int
    gate_up: list[NVFP4Tensor]
    down: list[NVFP4Tensor]
    xs: list[torch.Tensor]
    routes: list[tuple[torch.Tensor, torch.Tensor]]
    bf16_gate_up: torch.Tensor | None = None
    bf16_down: torch.Tensor | None = None
    shape: dict[str, int] = field(default_factory=lambda: dict(MOE_SHAPE))

    @classmethod
    def build(
        cls,
        m: int,
        *,
        weight_sets: int,
        route_sets: int,
        device="cuda",
        with_bf16: bool = True,
        shape: dict[str, int] | None = None,
    ) -> MoECase:
        shape = dict(shape or MOE_SHAPE)
        e, top_k, h, i = (shape[key] for key in ("experts", "top_k", "hidden", "inter"))
        gate_up = [random_nvfp4(2 * i, h, experts=e, device=device, seed=10 + s) for s in range(weight_sets)]
        down = [random_nvfp4(h, i, experts=e, device=device, seed=20 + s) for s in range(weight_sets)]
        xs = [torch.randn(m, h, device=device, dtype=torch.bfloat16) for _ in range(route_sets)]
        routes = [random_routing(m, e, top_k, device=device, seed=s) for s in range(route_sets)]
        case = cls(m, gate_up, down, xs, routes, shape=shape)
        if with_bf16:
            case.bf16_gate_up = gate_up[0].dequantize(torch.bfloat16)
            case.bf16_down = down[0].dequantize(torch.bfloat16)
        return case

    def runs(self, config: MoEConfig) -> bool:
        """Whether `config`'s path runs here as named (a fragment path falls back to the tiles where its kernels
        do not take the operands: timing it would time the fallback)."""
        from nvfp4kit.kernels.moe_dispatch import moe_path

        top_k = self.routes[0][0].shape[-1]
        return moe_path(self.xs[0], top_k, self.gate_up[0], self.down[0], config=config) == (
            config.path or "tiles"
        )

    def call(self, config: MoEConfig | None):
        from nvfp4kit.kernels.fused_moe import fused_moe  # triton: imported when a GPU case runs

        def run(i: int):
            ids, weights = self.routes[i % len(self.routes)]
            w = i % len(self.gate_up)
            return fused_moe(
                self.xs[i % len(self.xs)], ids, weights, self.gate_up[w], self.down[w], config=config
            )

        return run

    def bf16_call(self):
        """Per-expert cuBLAS loop (what plain torch does), routing indices prepared ahead so it can be captured."""
        plans = []
        for ids, weights in self.routes:
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=self.shape["experts"]).tolist()
            plan, start = [], 0
            for e, c in enumerate(counts):
                if c:
                    slots = order[start : start + c]
                    plan.append((e, slots // ids.shape[1], weights.reshape(-1)[slots][:, None]))
                start += c
            plans.append(plan)
        inter = self.shape["inter"]

        def run(i: int):
            x = self.xs[i % len(self.xs)]
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e, tokens, w in plans[i % len(plans)]:
                h = F.linear(x[tokens], self.bf16_gate_up[e])
                y = F.linear(gelu_tanh(h[:, :inter]) * h[:, inter:], self.bf16_down[e])
                out.index_add_(0, tokens, y.float() * w)
            return out.to(x.dtype)

        return run

    def error(self, config: MoEConfig | None) -> float:
        ids, weights = self.routes[0]
        ref = TorchBackend().moe(self.xs[0].float(), ids, weights, self.gate_up[0], self.down[0])
        return rel_error(self.call(config)(0), ref)

    def distinct_experts(self) -> float:
        return sum(torch.unique(ids).numel() for ids, _ in self.routes) / len(self.routes)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.shape["top_k"] * 3 * self.shape["inter"] * self.shape["hidden"]

    @property
    def bytes(self) -> float:
        per_expert = (nvfp4_bytes(self.gate_up[0]) + nvfp4_bytes(self.down[0])) / self.shape["experts"]
        return self.distinct_experts() * per_expert + 4 * self.m * self.shape["hidden"]

    @property
    def bf16_bytes(self) -> float:
        per_expert = 2 * 3 * self.shape["inter"] * self.shape["hidden"]
        return self.distinct_experts() * per_expert + 4 * self.m * self.shape["hidden"]
