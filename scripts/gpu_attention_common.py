"""Shared pieces of the attention GPU scripts: the 26B-A4B layer shapes, a KV pool with random history, metadata,
the fp32 truth and the engine's bf16 torch reference for one sequence.

Values are drawn like the model's: V (and stored K) of unit RMS (they come out of RMSNorm), k_norm weights in
[0.5, 1.5], and queries of RMS 3/sqrt(D), so q.k logits have a spread of about 3 (scale 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4kit.config import RopeConfig
from nvfp4kit.kernels.attention_launch import choose_num_splits, paged_prefill_block_q
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.kv_write import write_kv
from nvfp4kit.kernels.paged_attention import DerivedKey, paged_attention
from nvfp4kit.model.layers import apply_rope, attention, rope_cos_sin, rope_inv_freq

DEVICE = torch.device("cuda")
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class LayerShape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    derived: bool
    rope: RopeConfig


SLIDING = LayerShape("sliding", 16, 8, 256, 1024, False, RopeConfig("default", 10_000.0, 1.0))
GLOBAL = LayerShape("global", 16, 2, 512, None, True, RopeConfig("proportional", 1_000_000.0, 0.25))


def decode_splits(shape: LayerShape, batch: int, keys: int, kv_dtype: torch.dtype) -> int:
    """The engine's key-split count for `batch` decode rows of a layer of this shape reading `keys` keys."""
    return choose_num_splits(
        batch, shape.kv_heads, keys, device=DEVICE, head_dim=shape.head_dim,
        group=shape.q_heads // shape.kv_heads, fp8=kv_dtype.itemsize == 1,
    )  # fmt: skip


class Pool:
    """KV storage of one layer for a set of sequences: sliding rings (window + chunk) or a paged pool."""

    def __init__(self, shape: LayerShape, kv_dtype: torch.dtype, contexts: list[int], *, chunk: int = 2048,
                 block_size: int = 16, seed: int = 0):  # fmt: skip
        self.shape, self.dtype, self.contexts = shape, kv_dtype, contexts
        self.gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.ring_size = shape.window + chunk if shape.window else None
        self.block_size = block_size
        n = len(contexts)
        if self.ring_size:
            rows = n * self.ring_size
            self.table = torch.zeros(n, 1, dtype=torch.int32, device=DEVICE)
        else:
            per_seq = [-(-c // block_size) for c in contexts]
            total = sum(per_seq)
            perm = torch.randperm(total, device=DEVICE, generator=self.gen).int()
            self.table = torch.zeros(n, max(per_seq), dtype=torch.int32, device=DEVICE)
            at = 0
            for i, b in enumerate(per_seq):
                self.table[i, :b] = perm[at : at + b]
                at += b
            rows = total * block_size
        dims = (rows, shape.kv_heads, shape.head_dim)
        self.v_store = random_store(dims, kv_dtype, self.gen)
        self.k_store = None if shape.derived else random_store(dims, kv_dtype, self.gen)
        self.derived = None
        if shape.derived:
            inv_freq = rope_inv_freq(shape.rope, shape.head_dim).to(DEVICE)
            weight = torch.rand(shape.head_dim, device=DEVICE, generator=self.gen) + 0.5
            self.derived = DerivedKey(weight, inv_freq, int((inv_freq != 0).sum()))

    @property
    def kv_bytes(self) -> int:
        stores = [s for s in (self.k_store, self.v_store) if s is not None]
        return sum(s.numel() * s.element_size() for s in stores)

    def slots(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        if self.ring_size:
            return i * self.ring_size + positions % self.ring_size
        return (
            self.table[i].long()[positions // self.block_size] * self.block_size + positions % self.block_size
        )

    def write(self, i: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(v, k=None if self.k_store is None else k, slots=self.slots(i, positions), v_store=self.v_store,
                 k_store=self.k_store)  # fmt: skip

    def history(
        self, i: int, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of sequence i at `positions`, read as `dtype` like the engine's torch reference."""
        slots = self.slots(i, positions)
        values = self.v_store[slots].to(dtype)
        if self.derived is None:
            return self.k_store[slots].to(dtype), values
        keys = (values.float() * self.derived.k_norm_weight).to(dtype)
        cos, sin = rope_cos_sin(self.derived.inv_freq, positions, dtype)
        return apply_rope(keys, cos, sin), values

    def metadata(
        self, starts: list[int], lengths: list[int], *, block_q: int | None = None
    ) -> tuple[AttentionBatch, WorkItems]:
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        ints = torch.tensor(
            [starts, lengths, offsets, list(range(len(starts)))], dtype=torch.int32, device=DEVICE
        )
        batch = AttentionBatch(ints[0], ints[1], ints[2], self.table[: len(starts)], ints[3])
        shape = self.shape
        if block_q is None:
            block_q = (
                1
                if max(lengths) == 1
                else paged_prefill_block_q(shape.head_dim, shape.q_heads // shape.kv_heads)
            )
        seq, q0 = [], []
        for i, n in enumerate(lengths):
            for first in range(0, n, block_q):
                seq.append(i)
                q0.append(first)
        items = torch.tensor([seq, q0], dtype=torch.int32, device=DEVICE)
        return batch, WorkItems(items[0], items[1], block_q)

    def attend(self, q, batch, items, *, num_splits=None, config=None, out=None) -> torch.Tensor:
        if num_splits is None:
            num_splits = 1
            if items.block_q == 1:
                keys = max(self.contexts) if self.shape.window is None else self.shape.window
                num_splits = decode_splits(self.shape, len(items), keys, self.dtype)
        where = {"ring_size": self.ring_size} if self.ring_size else {"block_size": self.block_size}
        return paged_attention(
            q, v_store=self.v_store, k_store=self.k_store, batch=batch, items=items, window=self.shape.window,
            derived_key=self.derived, num_splits=num_splits, config=config, out=out,
            **where,
        )  # fmt: skip

    def reference(self, i: int, q: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
        """Sequence i's queries q [n, Hq, D] at positions start.. over its history: `dtype` float32 is the truth
        (fp32 math on the stored values), bfloat16 is what the engine's torch reference computes."""
        n = q.shape[0]
        lo = max(0, start - self.shape.window + 1) if self.shape.window else 0
        hist = torch.arange(lo, start + n, device=DEVICE)
        keys, values = self.history(i, hist, dtype)
        q_pos = torch.arange(start, start + n, device=DEVICE)
        return attention(
            q.to(dtype), keys, values, q_positions=q_pos, k_positions=hist, window=self.shape.window
        )


def random_store(dims: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A pool filled with N(0, 1) values (never zeros), written in slices to bound the fp32 scratch."""
    store = torch.empty(dims, dtype=dtype, device=DEVICE)
    step = max(1, (1 << 27) // (dims[1] * dims[2]))
    for lo in range(0, dims[0], step):
        hi = min(dims[0], lo + step)
        store[lo:hi] = torch.randn((hi - lo, *dims[1:]), device=DEVICE, generator=gen).to(dtype)
    return store


def random_queries(shape: LayerShape, tokens: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(tokens, shape.q_heads, shape.head_dim, device=DEVICE, generator=gen)
    return (q * 3.0 / shape.head_dim**0.5).bfloat16()
