"""Prefix caching: a request skips the prompt tokens whose KV an earlier request already computed.

A reuse of the first m tokens needs the global layers' KV of positions 0..m-1 and the sliding layers' KV of
the window before m (m-W+1..m-1). The window cannot be recomputed from the global KV alone (a sliding layer's
KV at p depends on the earlier sliding layers' windows, so the receptive field grows by W a layer), so both
are kept:

- Global pool: a full block of `block_size` tokens is keyed by a chain digest (sha256 of its parent's digest
  and its token ids) when its request releases it; blocks have reference counts, and unreferenced cached
  blocks stay allocatable in LRU order (`FreeBlocks`): allocation takes never-cached blocks first, then
  evicts the least recently freed cached one. A referenced block is never in the free container.
- Sliding rings: a released ring is parked (`FreeRings`) with the match points it can serve: block-aligned m
  up to its end whose window m-W+1..m-1 is still among the ring's last `ring_size` positions. A request
  adopts the ring (slot = position mod ring_size, so positions line up; the stale slots at or after m are
  written by its prefill before any query reads them). Parked rings count as free and are evicted LRU.

Identical prompts in flight together (`n > 1`) are prefilled once (`twin`): the others wait for the first,
then share its full blocks and take a copy of its ring. So does a prompt that extends a running request's whole
prompt (the next turn of a chat while the server warms its history, `serve/history_warmup.py`): it shares the
full blocks of that prompt.

Only full blocks are shared and a request writes only positions at or after its `num_computed`, so shared
blocks are never written. Requests with images neither match nor register (equal placeholder ids, different
images); `prompt_logprobs` requests do not match (they need every prompt position's logits). The match is
capped at len(ids) - 1: the last token is computed for its logits. A request's `cache_salt` seeds its digest
chain, so requests with different salts (or one without) never share blocks, rings or a twin's prefill.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from nvfp4kit.engine.kv_pools import KVCache
from nvfp4kit.engine.request import Request


class FreeBlocks:
    """Allocatable global blocks: never-cached ones (a stack, low ids first) and unreferenced cached ones (LRU)."""

    def __init__(self, blocks: Iterable[int], digest_of: dict[int, bytes], block_of: dict[bytes, int]):
        self.plain = list(blocks)
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.digest_of, self.block_of = digest_of, block_of  # the cache's tables (no reference back to it)

    def __len__(self) -> int:
        return len(self.plain) + len(self.cached)

    def pop(self) -> int:
        if self.plain:
            return self.plain.pop()
        block, _ = self.cached.popitem(last=False)  # evict the least recently freed cached block
        del self.block_of[self.digest_of.pop(block)]
        return block

    def extend(self, blocks: Iterable[int]) -> None:
        self.plain.extend(blocks)

    def append(self, block: int) -> None:
        self.plain.append(block)


class FreeRings:
    """Allocatable sliding rings: unused ones, then parked ones (LRU), which keep a finished request's window."""

    def __init__(self, rings: Iterable[int], ring_at: dict[bytes, int], points_of: dict[int, list[bytes]]):
        self.plain = list(rings)
        self.parked: OrderedDict[int, None] = OrderedDict()
        self.ring_at, self.points_of = ring_at, points_of

    def __len__(self) -> int:
        return len(self.plain) + len(self.parked)

    def pop(self) -> int:
        if self.plain:
            return self.plain.pop()
        ring, _ = self.parked.popitem(last=False)
        self.forget(ring)
        return ring

    def take(self, ring: int) -> None:
        del self.parked[ring]
        self.forget(ring)

    def forget(self, ring: int) -> None:
        """Drop a ring's match points (it is taken or evicted)."""
        for digest in self.points_of.pop(ring, []):
            if self.ring_at.get(digest) == ring:
                del self.ring_at[digest]

    def append(self, ring: int) -> None:
        self.plain.append(ring)


@dataclass(frozen=True)
class Hit:
    blocks: list[int]  # cached global blocks for the first `tokens` positions
    tokens: int
    ring: int | None  # the parked ring holding the window before `tokens` (None: no sliding layers)
    reclaimed: int  # how many of `blocks` are unreferenced (taken out of the free blocks on acquire)
    copy_ring_from: int | None = None  # a running twin's ring, copied into the request's new ring


WAIT = "wait"  # `twin`: a running request with the same prompt is still prefilling it


class PrefixCache:
    def __init__(self, cache: KVCache):
        layout, cfg = cache.layout, cache.cfg
        self.cache = cache  # (the cache refers to nothing here: no reference cycle)
        self.sliding_layers = layout.sliding_layers(cfg)
        self.block_size, self.ring_size, self.window = layout.block_size, layout.ring_size, cfg.sliding_window
        self.uses_rings = bool(layout.sliding_layers(cfg))
        self.refs = [0] * layout.num_blocks
        self.digest_of: dict[int, bytes] = {}  # cached block -> its digest
        self.block_of: dict[bytes, int] = {}  # digest -> cached block
        self.ring_at: dict[bytes, int] = {}  # digest of a match point's last block -> parked ring
        self.points_of: dict[int, list[bytes]] = {}  # parked ring -> its match points
        # the cache allocates from these (its free lists replaced); nothing here refers back to the cache
        self.free_blocks = cache.free_blocks = FreeBlocks(cache.free_blocks, self.digest_of, self.block_of)
        self.free_rings = cache.free_rings = FreeRings(cache.free_rings, self.ring_at, self.points_of)
        self.hit_tokens = 0  # prompt tokens served from the cache, in total

    # ---- digests -------------------------------------------------------------------------------------
    def digests(self, req: Request, count: int) -> list[bytes]:
        """Chain digests of the request's first `count` full blocks (kept on the request, extended as needed)."""
        have = req.block_digests
        if len(have) < count:
            ids, bs = req.all_ids, self.block_size
            parent = have[-1] if have else _salt_root(req.params.cache_salt)
            for i in range(len(have), count):
                parent = hashlib.sha256(parent + array("q", ids[i * bs : (i + 1) * bs]).tobytes()).digest()
                have.append(parent)
        return have[:count]

    # ---- admission -----------------------------------------------------------------------------------
    def match(self, req: Request) -> Hit | None:
        """The longest cached beginning of the request's tokens that can be reused, or None."""
        if req.images is not None or req.prompt_logprobs is not None:
            return None
        limit = (len(req.prompt_ids) + len(req.output_ids) - 1) // self.block_size
        if limit <= 0 or not self.block_of:
            return None
        digests = self.digests(req, limit)
        blocks = []
        for digest in digests:
            block = self.block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        ring = None
        if self.uses_rings:
            for i in range(len(blocks) - 1, -1, -1):
                ring = self.ring_at.get(digests[i])
                if ring is not None:
                    blocks = blocks[: i + 1]
                    break
            if ring is None:
                return None
        if not blocks:
            return None
        reclaimed = sum(1 for b in blocks if self.refs[b] == 0)
        return Hit(blocks, len(blocks) * self.block_size, ring, reclaimed)

    def twin(self, req: Request, running: list[Request]) -> Hit | str | None:
        """Identical prompts (`n > 1`, or the same prompt sent twice at once) are prefilled once: `WAIT` while a
        running twin is still prefilling the prompt, then a hit sharing the twin's full blocks and a copy of its
        ring (the request recomputes the last, partial block); None without a twin. A running request whose
        whole prompt (a full block at least) begins this one's counts as a twin too: its prompt's full blocks
        are shared (the twin writes only positions past its prompt, so never into them)."""
        if req.images is not None or req.prompt_logprobs is not None or req.output_ids:
            return None
        n, bs = len(req.prompt_ids), self.block_size
        for other in running:
            k = len(other.prompt_ids)
            if k > n or (k < n and k < bs) or other.images is not None or not _begins(other.prompt_ids, req):
                continue
            if other.params.cache_salt != req.params.cache_salt:
                continue
            if other.num_computed < k:
                return WAIT
            # full blocks of the shared prompt; an equal one leaves its last token to compute (its logits)
            m = (n - 1) // bs * bs if k == n else k // bs * bs
            window_kept = max(0, m - self.window + 1) >= other.num_computed - self.ring_size
            if m and other.ring is not None and (window_kept or not self.uses_rings):
                ring = other.ring if self.uses_rings else None
                return Hit(other.block_table[: m // bs], m, None, 0, copy_ring_from=ring)
        return None

    def copy_ring(self, source: int, target: int) -> None:
        """The sliding layers' KV of ring `source` into ring `target` (a fork of a twin's window)."""
        size = self.ring_size
        for layer in self.sliding_layers:
            for store in (self.cache.keys[layer], self.cache.values[layer]):
                store[target * size : (target + 1) * size] = store[source * size : (source + 1) * size]

    def acquire(self, hit: Hit) -> None:
        """Take the hit's blocks (reference + 1) and its parked ring for a request."""
        for block in hit.blocks:
            if self.refs[block] == 0:
                del self.free_blocks.cached[block]
            self.refs[block] += 1
        if hit.ring is not None:
            self.free_rings.take(hit.ring)
        self.hit_tokens += hit.tokens

    def hold(self, blocks: list[int]) -> None:
        """Newly allocated blocks: referenced once."""
        for block in blocks:
            self.refs[block] = 1

    def snapshot(self, req: Request) -> None:
        """At the end of a request's prompt: park a copy of its ring, when its reply may outgrow what the ring
        keeps beyond a window (then the ring it parks at release no longer holds the prompt's end). The next turn
        of a chat whose template drops the reply's thinking, or the same prompt sent again, matches there. Costs
        one ring copy and a parked ring slot (evicted LRU like any parked ring)."""
        if not self.uses_rings or req.ring is None or req.images is not None or req.output_ids:
            return
        spare = self.ring_size - self.window  # positions a ring holds beyond one window
        if req.params.max_tokens is not None and req.params.max_tokens < spare - self.block_size:
            return  # the ring parked at release still serves the prompt's end
        end = len(req.prompt_ids)
        points = self._match_points(self.digests(req, end // self.block_size), end)
        if not points or not len(self.free_rings):
            return
        ring = self.free_rings.pop()
        self.copy_ring(req.ring, ring)
        self.free_rings.parked[ring] = None
        self.points_of[ring] = points
        for digest in points:
            self.ring_at[digest] = ring

    # ---- release -------------------------------------------------------------------------------------
    def release(self, req: Request) -> None:
        """A request lets go of its KV: its full computed blocks are cached, its ring parked."""
        cacheable = req.images is None
        digests = self.digests(req, req.num_computed // self.block_size) if cacheable else []
        for block, digest in zip(req.block_table, digests):
            if block not in self.digest_of and digest not in self.block_of:
                self.digest_of[block], self.block_of[digest] = digest, block
        for block in reversed(req.block_table):  # the tail first: evicted before the shared beginning
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.digest_of:
                    self.free_blocks.cached[block] = None
                else:
                    self.free_blocks.plain.append(block)
        if req.ring is not None:
            points = self._match_points(digests, req.num_computed) if cacheable else []
            if points:
                self.free_rings.parked[req.ring] = None
                self.points_of[req.ring] = points
                for digest in points:
                    self.ring_at[digest] = req.ring
            else:
                self.free_rings.plain.append(req.ring)

    def _match_points(self, digests: list[bytes], end: int) -> list[bytes]:
        """Digests of the block-aligned m <= end whose window m-W+1..m-1 the ring (its last ring_size
        positions before `end`) still holds."""
        if not self.uses_rings:
            return []
        bs = self.block_size
        return [
            d for i, d in enumerate(digests) if max(0, (i + 1) * bs - self.window + 1) >= end - self.ring_size
        ]


def _begins(prefix: list[int], req: Request) -> bool:
    """Whether `prefix` is the beginning of the request's prompt (the cheap ends compared first)."""
    ids, k = req.prompt_ids, len(prefix)
    return k <= len(ids) and prefix[-1:] == ids[k - 1 : k] and prefix[:1] == ids[:1] and ids[:k] == prefix


def _salt_root(salt: str | None) -> bytes:
    """The digest chain's start: empty without a salt (the keys stay as they were), else the salt's digest."""
    return b"" if salt is None else hashlib.sha256(b"cache_salt:" + salt.encode()).digest()
