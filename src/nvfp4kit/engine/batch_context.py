"""One engine step's attention context: many sequences' tokens, flat, over the paged/ring KV cache.

Implements `AttentionContext.attend` for the model: write this step's K/V of every sequence into its slots,
then attend each sequence's queries over its history. The work goes to an attention backend (see
`attention_backend.py`: Triton kernels on CUDA, the torch code below on the CPU). `attend_reference` is the
torch reference every kernel is checked against.

`StepMetadata` holds what the kernels need, built once per step on the host and copied to the device in two
transfers: per sequence its first position, query length, row offset, block table (padded) and ring id; per
token its position and its pool rows. With `pad_to` a decode batch gets a fixed number of sequences (padding
sequences have no tokens, padding tokens a negative slot), so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nvfp4kit.engine.attention_backend import AttentionBackend, select_attention_backend
from nvfp4kit.engine.kv_pools import KVCache
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
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
    # [start, end) positions of image soft tokens attending both ways (sliding layers)
    image_spans: tuple[tuple[int, int], ...] = ()


def sliding_pieces(seq: SeqSlice, limit: int) -> list[SeqSlice]:
    """`seq`'s tokens in pieces of at most `limit`, in order, for the sliding layers (each piece writes its K/V to
    the ring, then attends). A cut never falls inside an image span (its tokens attend each other both ways)."""
    if seq.length <= limit:
        return [seq]
    pieces, first, end = [], seq.start, seq.start + seq.length
    while first < end:
        cut = min(first + limit, end)
        for a, b in seq.image_spans:
            if a < cut < b:
                cut = a  # the span starts the next piece
        if cut <= first:
            raise ValueError(f"an image of {limit}+ tokens does not fit one sliding pass of {limit} tokens")
        offset = seq.offset + first - seq.start
        pieces.append(SeqSlice(first, cut - first, offset, seq.block_table, seq.ring, seq.image_spans))
        first = cut
    return pieces


def sliding_passes(seqs: list[SeqSlice], limit: int) -> list[list[SeqSlice]] | None:
    """The step's sliding-layer passes: pass i holds the i-th piece of every sequence that has one. None when
    one pass takes the whole step (no sequence has more than `limit` tokens)."""
    if all(s.length <= limit for s in seqs):
        return None
    pieces = [sliding_pieces(s, limit) for s in seqs]
    return [[p[i] for p in pieces if i < len(p)] for i in range(max(map(len, pieces)))]


@dataclass
class StepMetadata:
    """Device tensors of one step for the kernels (see the module docstring), plus host copies for launch sizes."""

    batch: AttentionBatch
    positions: torch.Tensor  # [T] int64
    global_slots: torch.Tensor  # [T] int64 rows of the paged global pool (-1: padding)
    ring_slots: torch.Tensor  # [T] int64 rows of the sliding rings (-1: padding)
    starts: list[int]
    lengths: list[int]
    _items: dict[int, WorkItems | None] = field(default_factory=dict)
    # [T] int32: the last key position each token sees on sliding layers (its own, or its image's last
    # token); None when no token of the step belongs to an image attending both ways
    key_limit: torch.Tensor | None = None
    # rows past the step's tokens (a prefill graph's padding): attention writes them zeros, not stale memory
    padded_rows: bool = False
    _key_rows: tuple[torch.Tensor, int, int] | None = None

    @classmethod
    def build(
        cls, seqs: list[SeqSlice], cache: KVCache, device: torch.device | str, *, pad_to: int | None = None
    ) -> StepMetadata:
        """`pad_to`: a fixed sequence count (>= len(seqs)); padding sequences get no tokens but one row each
        after the real tokens, so a padded decode batch has exactly `pad_to` rows."""
        per_seq, per_token, starts, lengths = cls.host_tensors(seqs, cache, pad_to=pad_to)
        per_seq, per_token = per_seq.to(device, non_blocking=True), per_token.to(device, non_blocking=True)
        meta = cls.from_tensors(per_seq, per_token, starts, lengths)
        if any(s.image_spans for s in seqs):
            limit = [s.start + t for s in seqs for t in range(s.length)]
            for s in seqs:
                for a, b in s.image_spans:
                    for pos in range(max(a, s.start), min(b, s.start + s.length)):
                        limit[s.offset + pos - s.start] = b - 1
            meta.key_limit = torch.tensor(limit, dtype=torch.int32).to(device, non_blocking=True)
        return meta

    @staticmethod
    def host_tensors(
        seqs: list[SeqSlice], cache: KVCache, *, pad_to: int | None = None, max_blocks: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """The two host buffers of a step: int32 per sequence (four rows, then the block table padded to
        `max_blocks` columns, default the longest table) and int64 [3, T] per token (position, global and ring
        slot); plus the host lists of first positions and query lengths."""
        if pad_to is not None and pad_to < len(seqs):
            raise ValueError(f"pad_to={pad_to} is smaller than the batch ({len(seqs)} sequences)")
        layout = cache.layout
        num_pad = (pad_to or len(seqs)) - len(seqs)
        per_seq, starts, lengths, rings = per_seq_buffer(seqs, num_pad, max_blocks)
        tokens = sum(lengths)
        num_seqs = len(starts)
        bs, ring_size = layout.block_size, layout.ring_size
        if all(n <= 1 for n in lengths):  # decode: one token per sequence, plain arithmetic is fastest
            pos = [s.start for s in seqs if s.length] + [0] * num_pad
            glob = [s.block_table[s.start // bs] * bs + s.start % bs for s in seqs if s.length] + [
                -1
            ] * num_pad
            ring = [rings[i] * ring_size + s.start % ring_size for i, s in enumerate(seqs) if s.length]
            per_token = torch.tensor([pos, glob, ring + [-1] * num_pad], dtype=torch.int64)
            return per_seq, per_token, starts, lengths
        scalars, table = per_seq[: 4 * num_seqs].view(4, num_seqs), per_seq[4 * num_seqs :].view(num_seqs, -1)
        per_token = torch.full((3, tokens + num_pad), -1, dtype=torch.int64)
        per_token[0] = 0
        if tokens:
            real = len(seqs)
            seq_of = torch.repeat_interleave(torch.arange(real), scalars[1, :real].long(), output_size=tokens)
            pos = torch.arange(tokens) + (scalars[0, :real] - scalars[2, :real]).long()[seq_of]
            per_token[0, :tokens] = pos
            per_token[1, :tokens] = table[:real].long()[seq_of, pos // bs] * bs + pos % bs
            per_token[2, :tokens] = scalars[3, :real].long()[seq_of] * ring_size + pos % ring_size
        return per_seq, per_token, starts, lengths

    def sliding_pass(self, pieces: list[SeqSlice]) -> StepMetadata:
        """This step's metadata restricted to one sliding pass: the pieces' own rows per sequence; per token the
        step's positions, and ring slots only on the pieces' rows (the others write nothing in this pass)."""
        per_seq, starts, lengths, _ = per_seq_buffer(pieces, 0, self.batch.block_table.shape[1])
        flags = [False] * self.positions.shape[0]  # a Python list: one tensor op, not three per sequence
        for p in pieces:
            flags[p.offset : p.offset + p.length] = [True] * p.length
        keep = torch.tensor(flags, dtype=torch.bool).to(self.device, non_blocking=True)
        ring = torch.where(keep, self.ring_slots, torch.full_like(self.ring_slots, -1))
        per_token = torch.stack([self.positions, self.global_slots, ring])
        meta = StepMetadata.from_tensors(
            per_seq.to(self.device, non_blocking=True), per_token, starts, lengths
        )
        meta.key_limit = self.key_limit
        return meta

    @classmethod
    def from_tensors(
        cls, per_seq: torch.Tensor, per_token: torch.Tensor, starts: list[int], lengths: list[int]
    ) -> StepMetadata:
        """Metadata viewing the two (device) buffers of `host_tensors`; refilling them in place updates it."""
        num_seqs = len(starts)
        scalars, table = per_seq[: 4 * num_seqs].view(4, num_seqs), per_seq[4 * num_seqs :].view(num_seqs, -1)
        batch = AttentionBatch(
            seq_start=scalars[0],
            seq_len=scalars[1],
            seq_offset=scalars[2],
            ring=scalars[3],
            block_table=table,
        )
        return cls(batch, per_token[0], per_token[1], per_token[2], starts, lengths)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def decode_items(self) -> WorkItems | None:
        """One item per sequence with a single query token (padding sequences included: they write nothing)."""
        return self._work_items(1)

    def prefill_items(self, block_q: int) -> WorkItems | None:
        """Tiles of `block_q` query tokens over the sequences with more than one token this step."""
        return self._work_items(block_q)

    def set_items(self, items: WorkItems) -> None:
        """Use `items` as this step's work items of `items.block_q` query tokens (1: decode items) instead of
        building them (CUDA graphs keep theirs in fixed device buffers)."""
        self._items[items.block_q] = items

    def _work_items(self, block_q: int) -> WorkItems | None:
        if block_q not in self._items:
            pairs = work_item_pairs(self.lengths, block_q)
            items = None
            if pairs:
                packed = (
                    torch.tensor(pairs, dtype=torch.int32).T.contiguous().to(self.device, non_blocking=True)
                )
                items = WorkItems(packed[0], packed[1], block_q)
            self._items[block_q] = items
        return self._items[block_q]

    def prefill_key_rows(self) -> tuple[torch.Tensor, int, int]:
        """Where each prefill sequence's keys go in a pre-rotated key scratch (`kernels.rotated_keys`): first row
        per sequence (int32, on the device; -1 for decode sequences), total rows, most keys of one sequence.
        Built once a step, shared by the global layers."""
        if self._key_rows is None:
            from nvfp4kit.kernels.rotated_keys import prefill_key_rows

            first, total, most = prefill_key_rows(self.starts, self.lengths)
            rows = torch.tensor(first, dtype=torch.int32).to(self.device, non_blocking=True)
            self._key_rows = (rows, total, most)
        return self._key_rows

    def max_decode_keys(self, window: int | None) -> int:
        """Most keys any single-token sequence attends over (for sizing the key splits)."""
        ends = [s + n for s, n in zip(self.starts, self.lengths) if n == 1]
        if not ends:
            return 0
        return max(min(e, window) if window else e for e in ends)


def work_item_pairs(lengths: list[int], block_q: int) -> list[tuple[int, int]]:
    """(sequence, first query token) of each attention work item of a step whose sequences have `lengths` query
    tokens: block_q 1, one per sequence with at most one token (decode rows, padding sequences); else the tiles
    of `block_q` tokens of the sequences with more."""
    if block_q == 1:
        return [(i, 0) for i, n in enumerate(lengths) if n <= 1]
    return [(i, q0) for i, n in enumerate(lengths) if n > 1 for q0 in range(0, n, block_q)]


def per_seq_buffer(
    seqs: list[SeqSlice], num_pad: int, max_blocks: int | None
) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """The int32 per-sequence buffer (first positions, query lengths, row offsets, rings, then the block table
    padded to `max_blocks` columns, default the longest table) and its host lists, with `num_pad` padding
    sequences (no tokens, one row each after the real tokens)."""
    starts = [s.start for s in seqs] + [0] * num_pad
    lengths = [s.length for s in seqs] + [0] * num_pad
    tokens = sum(lengths)
    offsets = [s.offset for s in seqs] + list(range(tokens, tokens + num_pad))
    longest = max([1] + [len(s.block_table) for s in seqs])
    if max_blocks is not None and longest > max_blocks:
        raise ValueError(f"a block table of {longest} blocks exceeds max_blocks={max_blocks}")
    max_blocks = max_blocks or longest
    rings = [s.ring if s.ring is not None else 0 for s in seqs] + [0] * num_pad
    # one flat int32 buffer (four per-sequence rows, then the block table) and one int64 [3, T]: two copies.
    # Built from Python lists in one tensor call each: per-sequence tensor ops cost ~0.1 ms apiece on the host.
    flat = starts + lengths + offsets + rings
    for s in seqs:
        flat += s.block_table
        flat += [0] * (max_blocks - len(s.block_table))
    per_seq = torch.cat(
        [torch.tensor(flat, dtype=torch.int32), torch.zeros(num_pad * max_blocks, dtype=torch.int32)]
    )
    return per_seq, starts, lengths, rings


class BatchContext:
    def __init__(
        self,
        model: Gemma4Model,
        cache: KVCache,
        seqs: list[SeqSlice],
        device: torch.device,
        *,
        backend: str | AttentionBackend | None = None,
        metadata: StepMetadata | None = None,
    ):
        """`backend`: an attention backend or its name; default by device (see `select_attention_backend`).
        `metadata`: prebuilt step metadata (CUDA graphs keep theirs in fixed buffers); default: built from `seqs`."""
        self.model, self.cache, self.seqs = model, cache, seqs
        self.cfg = model.config
        self.device = torch.device(device)
        self.backend = (
            backend if hasattr(backend, "attend") else select_attention_backend(self.device, backend)
        )
        self._metadata = metadata
        self._sliding: list[StepMetadata] | None = None
        if self.backend.needs_metadata:
            self.positions = self.metadata.positions
        else:
            pos = [p for s in seqs for p in range(s.start, s.start + s.length)]
            self.positions = torch.tensor(pos, dtype=torch.long, device=self.device)

    @property
    def metadata(self) -> StepMetadata:
        if self._metadata is None:
            self._metadata = StepMetadata.build(self.seqs, self.cache, self.device)
        return self._metadata

    def sliding_metadata(self) -> list[StepMetadata]:
        """The metadata of each sliding-layer pass: the whole step's when no sequence has more tokens than a ring
        leaves room for (`KVCache.sliding_chunk`), else one per pass, built once for all sliding layers."""
        if self._sliding is None:
            passes = sliding_passes(self.seqs, self.cache.sliding_chunk)
            meta = self.metadata
            self._sliding = [meta] if passes is None else [meta.sliding_pass(p) for p in passes]
        return self._sliding

    def kv_sink(self, layer: int):
        """Where `layer`'s K/V go when the kernel that computes them can store them (None: `attend` writes them);
        the attention backend decides (`TritonAttentionBackend.kv_sink`)."""
        sink = getattr(self.backend, "kv_sink", None)
        return None if sink is None else sink(self, layer)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        return self.backend.attend(self, layer, q, k, v, window=window)

    def attend_reference(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        """The torch reference: per sequence, write its new K/V, gather its history, attend (sliding layers: per
        piece of at most `KVCache.sliding_chunk` tokens, as the ring only has room for that many new ones)."""
        cache, cfg = self.cache, self.cfg
        src = cfg.kv_source_layer(layer)
        sliding = cfg.is_sliding(layer)
        v_only = cache.keys[src] is None
        k_scale, v_scale = cache.scale(src, 0), cache.scale(src, 1)
        out = torch.empty_like(q)
        limit = cache.sliding_chunk if sliding else None
        for s in (p for seq in self.seqs for p in (sliding_pieces(seq, limit) if limit else [seq])):
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
                keys = self.derive_keys(src, values, hist)
            else:
                keys = cache.read(cache.keys[src], hist_slots, q.dtype, k_scale)
            spans = s.image_spans if sliding else ()  # global layers stay causal for image tokens too
            out[rows] = attention(
                q[rows], keys, values, q_positions=pos, k_positions=hist, window=window, bidirectional=spans
            )
        return out

    def derive_keys(self, layer: int, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """K of a k_eq_v layer from its stored V (= the normalised shared projection): times k_norm's weight, RoPE."""
        attn = self.model.layers[layer].self_attn
        keys = (values.float() * attn.k_norm.weight.float()).to(values.dtype)
        cos, sin = rope_cos_sin(attn.inv_freq, positions, values.dtype)
        return apply_rope(keys, cos, sin)
