"""The engine's KV storage for Gemma 4's two kinds of layers.

- Sliding-window layers: each running request owns a ring of `window + sliding chunk` slots per layer (a
  longer prefill chunk is attended in passes of the sliding chunk); token at position p lives in slot
  p % ring. Out-of-window tokens are overwritten, never kept, and there is no static SWA/full ratio to tune.
- Global layers: fixed-size blocks from one shared pool, listed in each request's block table, growing with
  the context. For `attention_k_eq_v` layers the normalised shared tensor (which *is* V) is stored once and
  K is derived from it at attention time (times k_norm's weight, then RoPE): half the global-layer KV.

KV may be BF16 or FP8 (E4M3/E5M2) with a per-tensor scale: stored = x / scale, read = stored * scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.engine.engine_config import EngineConfig
from nvfp4kit.kernels.thresholds import PREROTATE_MARGIN_BYTES
from nvfp4kit.plan.kv import kv_bytes_per_token
from nvfp4kit.plan.pools import rotated_keys_scratch_bytes, sliding_chunk

KV_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class KVLayout:
    """Shapes of the KV pools; computed once from the config and the engine's sizing."""

    block_size: int
    num_blocks: int  # global pool
    max_seqs: int  # sliding rings (one per running request)
    ring_size: int  # window + sliding chunk (the most tokens of a sequence one sliding-layer pass writes)
    k_eq_v_once: bool
    # bytes a step may use for pre-rotated derived keys (kernels/rotated_keys.py): the margin's share, or what
    # the plan reserves for max_model_len keys (plan.pools.rotated_keys_scratch_bytes)
    rotated_keys_budget: int = PREROTATE_MARGIN_BYTES

    def global_layers(self, cfg: Gemma4TextConfig) -> list[int]:
        return [
            i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i) and cfg.kv_source_layer(i) == i
        ]

    def sliding_layers(self, cfg: Gemma4TextConfig) -> list[int]:
        return [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i) and cfg.kv_source_layer(i) == i]

    def stores_v_only(self, cfg: Gemma4TextConfig, layer: int) -> bool:
        return self.k_eq_v_once and not cfg.is_sliding(layer) and not cfg.layer_has_v_proj(layer)


def pool_bytes(cfg: Gemma4TextConfig, layout: KVLayout, kv_dtype: str) -> tuple[int, int]:
    """(bytes per global-pool token, bytes of all sliding rings) for this layout: the planner's per-token KV
    bytes (`plan/kv.py`, the one source), which `KVCache`'s tensors match (tests/plan/test_pools.py)."""
    kv = kv_bytes_per_token(cfg, kv_dtype=kv_dtype, k_eq_v_once=layout.k_eq_v_once)
    return kv.full, kv.sliding * layout.ring_size * layout.max_seqs


class KVCache:
    """Tensors of both pools, plus the free lists of global blocks and sliding rings."""

    def __init__(
        self,
        cfg: Gemma4TextConfig,
        layout: KVLayout,
        *,
        kv_dtype: str = "bf16",
        device: torch.device | str = "cpu",
        scales: dict[int, tuple[float, float]] | None = None,
    ):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv dtype {kv_dtype!r}; choose from {sorted(KV_DTYPES)}")
        self.cfg, self.layout, self.kv_dtype = cfg, layout, KV_DTYPES[kv_dtype]
        self.scales = scales or {}
        self.keys: dict[int, torch.Tensor | None] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer in layout.global_layers(cfg):
            shape = (
                layout.num_blocks * layout.block_size,
                cfg.layer_kv_heads(layer),
                cfg.layer_head_dim(layer),
            )
            self.values[layer] = torch.zeros(shape, dtype=self.kv_dtype, device=device)
            self.keys[layer] = (
                None
                if layout.stores_v_only(cfg, layer)
                else torch.zeros(shape, dtype=self.kv_dtype, device=device)
            )
        for layer in layout.sliding_layers(cfg):
            shape = (layout.max_seqs * layout.ring_size, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer))
            self.keys[layer] = torch.zeros(shape, dtype=self.kv_dtype, device=device)
            self.values[layer] = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.free_blocks = list(range(layout.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.free_rings = list(range(layout.max_seqs - 1, -1, -1))

    # ---- allocation ----------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.layout.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return len(self.free_blocks) >= blocks

    def allocate_blocks(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise RuntimeError(f"KV pool exhausted: need {n} blocks, {len(self.free_blocks)} free")
        return [self.free_blocks.pop() for _ in range(n)]

    def free(self, blocks: list[int], ring: int | None) -> None:
        self.free_blocks.extend(reversed(blocks))
        if ring is not None:
            self.free_rings.append(ring)

    def allocate_ring(self) -> int | None:
        return self.free_rings.pop() if self.free_rings else None

    @property
    def usage(self) -> dict[str, float]:
        used_blocks = self.layout.num_blocks - len(self.free_blocks)
        used_rings = self.layout.max_seqs - len(self.free_rings)
        return {
            "global": used_blocks / max(1, self.layout.num_blocks),
            "sliding": used_rings / max(1, self.layout.max_seqs),
        }

    def nbytes(self) -> int:
        tensors = [t for t in (*self.keys.values(), *self.values.values()) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- slots ---------------------------------------------------------------------------------------
    def global_slots(self, block_table: list[int], positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=positions.device)
        bs = self.layout.block_size
        return table[positions // bs] * bs + positions % bs

    @property
    def sliding_chunk(self) -> int:
        """Most tokens of one sequence a sliding-layer pass may write before it attends: a pass writes its
        tokens first, so its first query's window and its last token must both fit the ring."""
        return max(1, self.layout.ring_size - (self.cfg.sliding_window or 0))

    def ring_slots(self, ring: int, positions: torch.Tensor) -> torch.Tensor:
        return ring * self.layout.ring_size + positions % self.layout.ring_size

    # ---- reads and writes (dtype conversion and scales live here) ------------------------------------
    def write(self, store: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float) -> None:
        store[slots] = (x.float() / scale).to(store.dtype) if scale != 1.0 else x.to(store.dtype)

    def read(
        self, store: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scale: float
    ) -> torch.Tensor:
        x = store[slots].to(dtype)
        return x * scale if scale != 1.0 else x

    def scale(self, layer: int, which: int) -> float:
        return self.scales.get(layer, (1.0, 1.0))[which]


def sized_layout(
    cfg: Gemma4TextConfig, config: EngineConfig, max_model_len: int, kv_dtype: str
) -> tuple[KVLayout, int, int]:
    """The engine's KV layout for `config` (device defaults applied): rings of window + one sliding pass per
    sequence slot, and global blocks for `num_kv_tokens`, else what `kv_cache_memory` leaves after the rings,
    else max_num_seqs x min(max_model_len, 4096) tokens. Also (bytes per global token, bytes of all rings)."""
    chunk = config.max_num_batched_tokens
    layout = KVLayout(
        block_size=config.block_size, num_blocks=1, max_seqs=config.max_num_seqs,
        ring_size=cfg.sliding_window + sliding_chunk(chunk, config.sliding_chunk), k_eq_v_once=config.k_eq_v_once,
        rotated_keys_budget=max(PREROTATE_MARGIN_BYTES, rotated_keys_scratch_bytes(cfg, max_model_len)),
    )  # fmt: skip
    per_token, ring_bytes = pool_bytes(cfg, layout, kv_dtype)
    tokens = config.num_kv_tokens
    if tokens is None:
        if config.kv_cache_memory is None:
            tokens = config.max_num_seqs * min(max_model_len, 4096)
        else:
            tokens = (config.kv_cache_memory - ring_bytes) // max(per_token, 1)
    if config.kv_cache_memory is not None and tokens < layout.block_size:
        raise ValueError(
            f"kv_cache_memory={config.kv_cache_memory} B is too small: the sliding rings alone need "
            f"{ring_bytes} B and one global block {per_token * layout.block_size} B"
        )
    num_blocks = max(1, tokens // layout.block_size)
    return replace(layout, num_blocks=num_blocks), per_token, ring_bytes
