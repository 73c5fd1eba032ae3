"""One engine step's attention context: many sequences' tokens, flat, over the paged/ring KV cache.

Implements `AttentionContext.attend` for the model: write this step's K/V of every sequence into its slots,
then attend each sequence's queries over its history. This torch version is the reference; a kernel
backend replaces `attend` on the GPU with the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4kit.engine.kv_cache import KVCache
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.layers import apply_rope, attention, rope_cos_sin


@dataclass
class SeqSlice:
    """Where one sequence's tokens sit in this step and where its KV lives."""

    start: int  # position of its first token in this step
    length: int  # tokens in this step
    offset: int  # row of its first token in the flat batch
    block_table: list[int]
    ring: int


class BatchContext:
    def __init__(self, model: Gemma4Model, cache: KVCache, seqs: list[SeqSlice], device: torch.device):
        self.model, self.cache, self.seqs = model, cache, seqs
        self.cfg = model.config
        self.positions = torch.cat([torch.arange(s.start, s.start + s.length, device=device) for s in seqs])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        cache, cfg = self.cache, self.cfg
        src = cfg.kv_source_layer(layer)
        sliding = cfg.is_sliding(layer)
        v_only = cache.keys[src] is None
        k_scale, v_scale = cache.scale(src, 0), cache.scale(src, 1)
        out = torch.empty_like(q)
        for s in self.seqs:
            rows = slice(s.offset, s.offset + s.length)
            pos = self.positions[rows]
            end = s.start + s.length
            if sliding:
                hist = torch.arange(max(0, s.start - window + 1), end, device=q.device)
                new_slots, hist_slots = cache.ring_slots(s.ring, pos), cache.ring_slots(s.ring, hist)
            else:
                hist = torch.arange(0, end, device=q.device)
                new_slots = cache.global_slots(s.block_table, pos)
                hist_slots = cache.global_slots(s.block_table, hist)
            if k is not None:
                cache.write(cache.values[src], new_slots, v[rows], v_scale)
                if not v_only:
                    cache.write(cache.keys[src], new_slots, k[rows], k_scale)
            values = cache.read(cache.values[src], hist_slots, q.dtype, v_scale)
            if v_only:
                keys = self._derive_keys(src, values, hist)
            else:
                keys = cache.read(cache.keys[src], hist_slots, q.dtype, k_scale)
            out[rows] = attention(q[rows], keys, values, q_positions=pos, k_positions=hist, window=window)
        return out

    def _derive_keys(self, layer: int, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """K of a k_eq_v layer from its stored V (= the normalised shared projection): times k_norm's weight, RoPE."""
        attn = self.model.layers[layer].self_attn
        keys = (values.float() * attn.k_norm.weight.float()).to(values.dtype)
        cos, sin = rope_cos_sin(attn.inv_freq, positions, values.dtype)
        return apply_rope(keys, cos, sin)
