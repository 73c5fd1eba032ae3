"""nvfp4kit's own KV plan: what the engine allocates at start-up from the free memory it measures.

Differences from the seed's SGLang pools (see sglang.py):
- global (full-attention) layers with `attention_k_eq_v` store their shared K=V tensor once (half the bytes);
- sliding layers get a per-request ring of `window + sliding_chunk` tokens (the prefill chunk up to 512: longer
  chunks attend sliding layers in passes) instead of a shared pool split by a hand-tuned ratio, so a request
  never waits on, or is evicted from, sliding KV;
- the runtime reserve (prefill activations, logits, CUDA graphs, the weight-expansion scratch of prefill-sized
  GEMMs, a margin) is computed, not guessed with a
  memory fraction; whatever is left is the global-layer pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.kernels.thresholds import (
    DEQUANT_MIN_M,
    MOE_PREFILL_MIN_TOKENS,
    PREROTATE_MARGIN_BYTES,
    PREROTATE_MIN_KEYS,
)
from nvfp4kit.plan.kv import KVBytesPerToken, kv_bytes_per_token
from nvfp4kit.plan.units import MiB
from nvfp4kit.plan.vision import VisionMemory

# vLLM's default share of the card the engine may use (weights, graphs, activations and KV together).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90

DEFAULT_PREFILL_CHUNK = 512  # the engine's tokens a step on the CPU (GPUs: `default_prefill_chunk`)
LARGE_GPU_BYTES = 70 * 2**30
# most tokens of one sequence a sliding-layer attention pass takes; each sequence's ring holds window + this.
# A step with longer prefill chunks attends its sliding layers in passes (engine/batch_context.py), so a large
# --max-num-batched-tokens speeds prefill up without growing every sequence's ring with it
DEFAULT_SLIDING_CHUNK = 512
LARGE_GPU_SLIDING_CHUNK = 2048  # `default_sliding_chunk` on cards with LARGE_GPU_BYTES or more
DEFAULT_MAX_BATCH = 64
GRAPH_POOL_BASE = 128 * MiB  # CUDA-graph private pool: per-layer temporaries, split-K workspaces, bookkeeping
GRAPH_LOGIT_BYTES = (
    14  # per vocab entry and captured row: the shared fp32 output + bf16/fp32 temporaries of the head
)
MIN_MARGIN = 256 * MiB  # allocator fragmentation, cuBLAS/Triton workspaces
MARGIN_FRACTION = 0.015  # ... or 1.5% of free memory, whichever is larger
ACT_BYTES = 2  # BF16 activations
LOGIT_BYTES = 4  # FP32 logits


@dataclass(frozen=True)
class RuntimeReserve:
    activations: int  # peak of one prefill chunk through a layer
    logits: int
    cuda_graphs: int
    margin: int
    scratch: int = 0  # BF16 expansion of NVFP4 weights for prefill-sized GEMMs (kernels/dequant.py)
    rotated_keys: int = 0  # pre-rotated derived keys past the margin's share (`rotated_keys_scratch_bytes`)

    @property
    def total(self) -> int:
        return (
            self.activations + self.logits + self.cuda_graphs + self.margin + self.scratch + self.rotated_keys
        )


def activation_bytes_per_token(cfg: Gemma4TextConfig) -> int:
    """Live activation bytes per token inside the widest layer (all buffers counted at once: an upper bound)."""
    h = cfg.hidden_size
    widest = 0
    for layer in range(cfg.num_hidden_layers):
        hd, kvh = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
        q = cfg.num_attention_heads * hd
        attn = q + 2 * kvh * hd + q  # qkv output, attention output
        mlp = 3 * cfg.layer_intermediate_size(layer)  # gate/up output + activated product
        moe = cfg.top_k_experts * (3 * cfg.moe_intermediate_size + h) if cfg.enable_moe_block else 0
        ple = 2 * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
        widest = max(widest, 4 * h + attn + mlp + moe + ple)  # 4h: residual, normed input, two outputs
    return widest * ACT_BYTES


def default_prefill_chunk(gpu_memory_bytes: int | None) -> int:
    """The engine's tokens a step (`--max-num-batched-tokens`) when none are given, as vLLM's server: 8192 on
    GPUs with 70+ GiB (a long prompt in few, large GEMMs), 2048 on smaller ones (a big chunk's activations would
    take KV room), `DEFAULT_PREFILL_CHUNK` without a GPU (None)."""
    if gpu_memory_bytes is None:
        return DEFAULT_PREFILL_CHUNK
    return 8192 if gpu_memory_bytes >= LARGE_GPU_BYTES else 2048


def default_sliding_chunk(gpu_memory_bytes: int | None) -> int:
    """The cap on a sliding-layer pass when none is given: 2048 tokens on GPUs with 70+ GiB, `DEFAULT_SLIDING_CHUNK`
    (512) on smaller ones and the CPU. Each pass costs launches and host time: on the H200 a cached chat turn of
    ~1.6K new tokens took 26 ms more in passes of 512 (115 vs 89 ms TTFT); a ring of window + 2048 costs 157 MB
    more per sequence slot for 26B-A4B (FP8), room a 24 GB card does not have."""
    if gpu_memory_bytes is not None and gpu_memory_bytes >= LARGE_GPU_BYTES:
        return LARGE_GPU_SLIDING_CHUNK
    return DEFAULT_SLIDING_CHUNK


def default_prefill_graphs(gpu_memory_bytes: int | None) -> tuple[int, ...]:
    """The token counts whose prefill steps are captured in CUDA graphs when none are given: every multiple of 256
    up to 2048 on GPUs with 70+ GiB, none on smaller ones (their pool would come out of a tight KV budget; untimed
    there) and the CPU. On the H200 (session 11) a 602-token prompt's step took 26.5 ms replayed against 52.1
    eager, the same prompt beside 96 decodes 36.6 ms against 101.8: an eager step waits for the host's ~700
    launches. A step replays the smallest graph that holds it, so the counts are close together: with only 1024
    and 2048, a 1,049-token turn padded to 2048 (H100, session 17: TTFT 55.9 ms, 45.0 with a 1280 graph). The
    smaller graphs reuse the largest one's memory pool."""
    if gpu_memory_bytes is not None and gpu_memory_bytes >= LARGE_GPU_BYTES:
        return tuple(range(256, 2048 + 1, 256))
    return ()


def sliding_chunk(prefill_chunk: int, limit: int | None = None) -> int:
    """Tokens of a sequence one sliding-layer pass takes: the prefill chunk, capped at `limit` (default
    `DEFAULT_SLIDING_CHUNK`)."""
    return min(prefill_chunk, limit or DEFAULT_SLIDING_CHUNK)


def expansion_scratch_bytes(cfg: Gemma4TextConfig, prefill_chunk: int) -> int:
    """The one BF16 buffer that prefill-sized NVFP4 GEMMs expand weights into, shared by every layer and grown to
    its largest user: the widest linear from `DEQUANT_MIN_M` tokens a chunk, every expert's [E, I, H] block from
    `MOE_PREFILL_MIN_TOKENS` (507 MiB for 26B-A4B; on cards without grouped GEMMs that path does not run, so this
    over-reserves there). An upper bound: counted as if every linear were NVFP4."""
    h, widest = cfg.hidden_size, 0
    if prefill_chunk >= DEQUANT_MIN_M:
        for layer in range(cfg.num_hidden_layers):
            hd, kvh = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
            q = cfg.num_attention_heads * hd
            widest = max(widest, (q + 2 * kvh * hd) * h, q * h, 2 * cfg.layer_intermediate_size(layer) * h)
    if prefill_chunk >= MOE_PREFILL_MIN_TOKENS and cfg.enable_moe_block:
        widest = max(widest, cfg.num_experts * cfg.moe_intermediate_size * h)
    return widest * ACT_BYTES


def rotated_keys_scratch_bytes(cfg: Gemma4TextConfig, keys: int) -> int:
    """The scratch of derived keys' rotated columns (kernels/rotated_keys.py) for a step whose prefill
    sequences hold `keys` keys: 0 when no layer derives K from V or the path would not run. Counted at 16-bit
    (the dot dtype of BF16/FP16 models; an fp32 model's scratch takes half as many keys in the same bytes)."""
    if not cfg.attention_k_eq_v or keys < PREROTATE_MIN_KEYS:
        return 0
    per_key = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_sliding(layer):
            continue
        head_dim = cfg.layer_head_dim(layer)
        pairs = int(head_dim * cfg.layer_rope(layer).partial_rotary_factor) // 2
        rot = min(head_dim // 2, max(16, 1 << max(pairs - 1, 0).bit_length()))  # as the kernels round it
        per_key = max(per_key, cfg.layer_kv_heads(layer) * 2 * rot * ACT_BYTES)
    return keys * per_key


def runtime_reserve(
    cfg: Gemma4TextConfig,
    *,
    free_bytes: int,
    prefill_chunk: int,
    max_batch: int,
    prefill_graph_tokens: int = 0,
    context: int = 0,
) -> RuntimeReserve:
    """Memory the engine keeps outside weights and KV: sized from the model, the chunk and the batch (and the
    largest captured prefill graph's tokens, `--prefill-graphs`); `context` (the longest prompt) sizes the
    pre-rotated keys' scratch beyond the margin's share."""
    per_token = activation_bytes_per_token(cfg)
    activations = prefill_chunk * per_token
    logits = max_batch * cfg.vocab_size * LOGIT_BYTES * 2  # logits + sampling probabilities
    # decode graphs share one pool and one logits buffer, sized by the largest batch (measured on the H100:
    # 174 MiB for batch sizes 1-8 of 26B-A4B, of which the lm_head's [B, vocab] tensors are most)
    graphs = GRAPH_POOL_BASE + max_batch * (per_token + GRAPH_LOGIT_BYTES * cfg.vocab_size)
    if prefill_graph_tokens:  # their own pool: the largest step's activations, and logits for every slot
        graphs += prefill_graph_tokens * per_token + (max_batch + 1) * GRAPH_LOGIT_BYTES * cfg.vocab_size
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * free_bytes))
    scratch = expansion_scratch_bytes(cfg, prefill_chunk)
    rotated = max(0, rotated_keys_scratch_bytes(cfg, context) - PREROTATE_MARGIN_BYTES)
    return RuntimeReserve(activations, logits, graphs, margin, scratch, rotated)


@dataclass(frozen=True)
class PoolPlan:
    free_bytes: int
    weights_bytes: int
    reserve: RuntimeReserve
    kv: KVBytesPerToken
    prefill_chunk: int
    max_position: int
    context: int
    concurrency: int
    vision: VisionMemory | None = None  # the vision tower and one image's encoder peak, when images are on
    sliding_limit: int | None = None  # cap on a sliding-layer pass (`sliding_chunk`; None: the default)

    @property
    def vision_bytes(self) -> int:
        return self.vision.total if self.vision is not None else 0

    @property
    def kv_budget_bytes(self) -> int:
        return self.free_bytes - self.weights_bytes - self.reserve.total - self.vision_bytes

    @property
    def fits(self) -> bool:
        return self.kv_budget_bytes >= self.ring_bytes(self.max_ring_tokens) + self.kv.full

    @property
    def max_ring_tokens(self) -> int:
        """Sliding-layer ring per request: the window plus one sliding-layer pass (`sliding_chunk`) in flight."""
        return (
            self.kv.window + sliding_chunk(self.prefill_chunk, self.sliding_limit) if self.kv.sliding else 0
        )

    def ring_bytes(self, tokens: int) -> int:
        return tokens * self.kv.sliding

    def request_bytes(self, context: int) -> int:
        """KV one request of `context` tokens holds: global layers whole, sliding layers its ring."""
        ring = min(context, self.max_ring_tokens)
        return context * self.kv.full + self.ring_bytes(ring)

    @property
    def max_context(self) -> int:
        """Longest single request that fits (capped at the model's max_position_embeddings)."""
        room = self.kv_budget_bytes - self.ring_bytes(self.max_ring_tokens)
        if room <= 0:
            return 0
        if not self.kv.full:
            return self.max_position
        return min(self.max_position, room // self.kv.full)

    @property
    def requests_at_context(self) -> int:
        """Requests of `context` tokens that fit at once."""
        if self.kv_budget_bytes <= 0 or self.context <= 0:
            return 0
        return self.kv_budget_bytes // self.request_bytes(self.context)

    @property
    def global_tokens(self) -> int:
        """Tokens the global-layer pool holds with `concurrency` rings allocated (the pool is shared)."""
        room = self.kv_budget_bytes - self.concurrency * self.ring_bytes(self.max_ring_tokens)
        if room <= 0:
            return 0
        if not self.kv.full:
            return self.concurrency * self.max_position
        return room // self.kv.full


def plan_pools(
    cfg: Gemma4TextConfig,
    *,
    free_bytes: int,
    weights_bytes: int,
    kv_dtype: str = "fp8_e5m2",
    k_eq_v_once: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    context: int | None = None,
    concurrency: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    reserve: RuntimeReserve | None = None,
    vision: VisionMemory | None = None,
    sliding_limit: int | None = None,
    prefill_graph_tokens: int = 0,
) -> PoolPlan:
    """Split `free_bytes` (measured before loading) into weights, runtime reserve, the vision tower (weights
    and one image's encoder activations, when `vision` is given) and KV pools. Without a `reserve`, it is sized
    here (`runtime_reserve`, with the pool of captured prefill steps of up to `prefill_graph_tokens`)."""
    if prefill_chunk <= 0 or concurrency <= 0 or max_batch <= 0:
        raise ValueError(
            f"prefill_chunk, concurrency and max_batch must be positive "
            f"(got {prefill_chunk}, {concurrency}, {max_batch})"
        )
    if context is not None and context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    kv = kv_bytes_per_token(cfg, kv_dtype=kv_dtype, k_eq_v_once=k_eq_v_once)
    if reserve is None:
        reserve = runtime_reserve(
            cfg, free_bytes=free_bytes, prefill_chunk=prefill_chunk, max_batch=max(max_batch, concurrency),
            prefill_graph_tokens=prefill_graph_tokens,
            context=cfg.max_position_embeddings,  # the engine serves up to the model's limit by default
        )  # fmt: skip
    return PoolPlan(
        free_bytes=free_bytes,
        weights_bytes=weights_bytes,
        reserve=reserve,
        kv=kv,
        prefill_chunk=prefill_chunk,
        max_position=cfg.max_position_embeddings,
        context=context if context is not None else cfg.max_position_embeddings,
        concurrency=concurrency,
        vision=vision,
        sliding_limit=sliding_limit,
    )
