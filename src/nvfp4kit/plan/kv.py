"""KV-cache bytes per token, per layer type.

Gemma 4 interleaves sliding-window layers (keys/values needed only for the last `sliding_window` tokens) with
global layers (needed for the whole sequence). Global layers with `attention_k_eq_v` have no v_proj: K and V
both come from one normalized projection, so an engine can store that tensor once and derive K in the
attention kernel (`k_eq_v_once`), halving global-layer KV. SGLang and vLLM store K and V separately.
KV-shared layers (E2B/E4B) read an earlier layer's cache and store nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4kit.config import Gemma4TextConfig

KV_DTYPE_BYTES = {"fp8_e5m2": 1, "fp8_e4m3": 1, "bf16": 2}
# Other names the engine accepts for its cache (float32 is for CPU runs); not shown as plan columns.
ENGINE_KV_DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "fp32": 4}


def kv_dtype_bytes(kv_dtype: str) -> int:
    try:
        return KV_DTYPE_BYTES.get(kv_dtype) or ENGINE_KV_DTYPE_BYTES[kv_dtype]
    except KeyError:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; known: {', '.join(KV_DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class KVBytesPerToken:
    """Bytes one token adds to the cache: summed over the layers of each type that store KV."""

    kv_dtype: str
    k_eq_v_once: bool
    sliding: int
    full: int
    sliding_layers: int  # layers that store sliding KV
    full_layers: int
    window: int

    @property
    def sliding_per_layer(self) -> int:
        return self.sliding // self.sliding_layers if self.sliding_layers else 0

    @property
    def full_per_layer(self) -> int:
        return self.full // self.full_layers if self.full_layers else 0

    def sequence_bytes(self, tokens: int, *, sliding_tokens: int | None = None) -> int:
        """KV of one sequence of `tokens`; sliding layers hold min(tokens, window) unless told otherwise."""
        held = min(tokens, self.window) if sliding_tokens is None else sliding_tokens
        return self.full * tokens + self.sliding * held


def kv_bytes_per_token(
    cfg: Gemma4TextConfig, *, kv_dtype: str = "fp8_e5m2", k_eq_v_once: bool = False
) -> KVBytesPerToken:
    """Per-token KV bytes of sliding and of global layers (K and V separate unless `k_eq_v_once`)."""
    elem = kv_dtype_bytes(kv_dtype)
    sliding = full = n_sliding = n_full = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.kv_source_layer(layer) != layer:
            continue  # reads another layer's cache
        tensors = 2
        if k_eq_v_once and not cfg.layer_has_v_proj(layer):
            tensors = 1
        per_layer = tensors * cfg.layer_kv_heads(layer) * cfg.layer_head_dim(layer) * elem
        if cfg.is_sliding(layer):
            sliding, n_sliding = sliding + per_layer, n_sliding + 1
        else:
            full, n_full = full + per_layer, n_full + 1
    return KVBytesPerToken(kv_dtype, k_eq_v_once, sliding, full, n_sliding, n_full, cfg.sliding_window)
