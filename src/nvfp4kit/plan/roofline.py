"""Decode roofline: bytes a decode step must read, over the card's bandwidth, is the ceiling on tokens/s.

At batch B a step reads every non-expert weight once (attention, dense MLP, routers, norms, PLE projections,
the BF16 lm_head), the experts the B tokens route to (with uniform routing, E * (1 - (1 - k/E)^B) distinct
experts per layer), one embedding row per token, and each sequence's KV at its context.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.plan.kv import KVBytesPerToken
from nvfp4kit.plan.weights import BF16_BYTES, WeightBreakdown, expert_bytes

ALWAYS_READ = ("attention", "dense_mlp", "router", "norms", "per_layer_projections", "lm_head", "other")


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected experts touched per layer by `batch` tokens routing top-k of E uniformly."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


@dataclass(frozen=True)
class DecodeStep:
    batch: int
    context: int
    bytes_by_part: dict[str, float]
    bandwidth_bytes_per_s: float

    @property
    def bytes_per_step(self) -> float:
        return sum(self.bytes_by_part.values())

    @property
    def seconds_per_step(self) -> float:
        return self.bytes_per_step / self.bandwidth_bytes_per_s

    @property
    def tokens_per_s(self) -> float:
        """Upper bound on aggregate decode tokens/s (every sequence gets one token per step)."""
        return self.batch / self.seconds_per_step

    @property
    def tokens_per_s_per_request(self) -> float:
        return 1.0 / self.seconds_per_step


def decode_step(
    cfg: Gemma4TextConfig,
    weights: WeightBreakdown,
    kv: KVBytesPerToken,
    *,
    batch: int,
    context: int,
    bandwidth_bytes_per_s: float,
    fp8_lm_head: bool = False,
) -> DecodeStep:
    """Bytes read by one decode step of `batch` sequences at `context` tokens each (`fp8_lm_head`: logits from
    the engine's FP8 copy of the output projection, one byte a weight and an fp32 scale a row)."""
    if batch <= 0 or context < 0:
        raise ValueError(f"batch must be positive and context non-negative (got {batch}, {context})")
    parts: dict[str, float] = {c: float(weights.get(c)) for c in ALWAYS_READ if weights.get(c)}
    if cfg.tie_word_embeddings:
        parts["lm_head"] = float(weights.get("embeddings"))  # the tied table is the output projection
    if fp8_lm_head:
        parts["lm_head"] = float(cfg.vocab_size * (cfg.hidden_size + 4))
    if cfg.enable_moe_block:
        distinct = expected_distinct_experts(cfg.num_experts, cfg.top_k_experts, batch)
        parts["experts"] = distinct * cfg.num_hidden_layers * expert_bytes(cfg, weights)
    parts["embedding_rows"] = float(batch * cfg.hidden_size * BF16_BYTES)
    if cfg.hidden_size_per_layer_input:
        ple_row = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input * BF16_BYTES
        parts["per_layer_embedding_rows"] = float(batch * ple_row)
    parts["kv_cache"] = float(batch * kv.sequence_bytes(context))
    return DecodeStep(batch, context, parts, bandwidth_bytes_per_s)
