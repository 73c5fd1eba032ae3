"""The simplest KV cache: one sequence, every layer's keys/values kept contiguously.

It is the reference the paged engine is tested against, and what `Gemma4Model` uses for plain
incremental decoding. Layers that share KV (the last `num_kv_shared_layers`) read their source layer's.
"""

from __future__ import annotations

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.model.layers import attention


class ContiguousKVCache:
    def __init__(self, cfg: Gemma4TextConfig):
        self.cfg = cfg
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0

    def step(self, num_tokens: int, *, device: torch.device | str = "cpu") -> _Step:
        """Context for the next `num_tokens` tokens; call `commit()` on it after the forward pass."""
        positions = torch.arange(self.length, self.length + num_tokens, device=device)
        return _Step(self, positions)


class _Step:
    def __init__(self, cache: ContiguousKVCache, positions: torch.Tensor):
        self.cache = cache
        self.positions = positions

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        cache = self.cache
        if k is not None:
            if layer in cache.keys:
                cache.keys[layer] = torch.cat([cache.keys[layer], k])
                cache.values[layer] = torch.cat([cache.values[layer], v])
            else:
                cache.keys[layer], cache.values[layer] = k, v
            src = layer
        else:
            src = cache.cfg.kv_source_layer(layer)
        keys, values = cache.keys[src], cache.values[src]
        k_positions = torch.arange(keys.shape[0], device=keys.device)
        return attention(q, keys, values, q_positions=self.positions, k_positions=k_positions, window=window)

    def commit(self) -> None:
        self.cache.length += self.positions.numel()
