"""Continuous batching with chunked prefill.

Each step has a token budget. Running requests go first, oldest first: a decode costs one token, a
request still in prefill takes a chunk. Waiting requests are admitted in arrival order while the budget,
a free sliding ring and enough global blocks for their first chunk allow. When the global pool runs dry,
the newest running request is preempted (its KV freed) and later recomputed from its prompt plus the tokens
it already produced, so its output is unchanged. Prompts that arrive while many requests decode may wait a few
steps to be prefilled together (`admission_due`). With prefix caching (`prefix_cache.py`), an admitted request
starts after the longest cached beginning of its tokens (global blocks and a parked sliding ring reused); one
whose twin (a running request with its prompt, or with the beginning of it) is still prefilling waits for that
prefill, set aside while the requests behind it are admitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nvfp4kit.engine.kv_pools import KVCache
from nvfp4kit.engine.prefix_cache import WAIT, PrefixCache
from nvfp4kit.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # token budget of one step
    max_prefill_chunk: int = 512  # tokens of one request's prefill in one step (the ring holds window + this)
    # admission batching (`Scheduler.admission_due`): prompts arriving while at least `admission_min_running`
    # requests run wait up to `admission_delay` steps for more prompts, unless `admission_tokens` are waiting
    admission_delay: int = 0
    admission_min_running: int = 32
    admission_tokens: int = 4096


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache, *, prefix_caching: bool = False):
        self.config = config
        self.cache = cache
        self.prefix = PrefixCache(cache) if prefix_caching else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._waited = 0  # steps the waiting requests have been held back for company (admission batching)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """Pick (request, number of tokens) pairs for the next step."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted while making room for an older request
                continue
            n = self._fit(req, min(req.remaining, budget, self.config.max_prefill_chunk))
            if n == 0:  # its next image needs more of this step's budget
                continue
            if not self._grow(req, req.num_computed + n):
                continue
            batch.append((req, n))
            budget -= n
        admitted_before = len(batch)
        deferred: list[Request] = []  # waiting for a twin's prefill: the requests behind them go first
        while self.waiting and budget > 0 and self.cache.free_rings and self.admission_due():
            req = self.waiting[0]
            hit = None
            if self.prefix is not None:
                hit = self.prefix.twin(req, self.running)
                if hit == WAIT:  # its twin's prefill is under way: share it instead of repeating it
                    deferred.append(self.waiting.popleft())
                    continue
                hit = hit or self.prefix.match(req)
            req.num_computed = hit.tokens if hit else 0  # the KV of a cached beginning is there already
            n = self._fit(req, min(req.remaining, budget, self.config.max_prefill_chunk))
            blocks = self.cache.blocks_for(req.num_computed + n) - (len(hit.blocks) if hit else 0)
            if n == 0 or not self.cache.can_allocate(blocks + (hit.reclaimed if hit else 0)):
                req.num_computed = 0
                break
            self.waiting.popleft()
            if hit:
                self.prefix.acquire(hit)
            req.ring = hit.ring if hit and hit.ring is not None else self.cache.allocate_ring()
            if hit and hit.copy_ring_from is not None:
                self.prefix.copy_ring(hit.copy_ring_from, req.ring)
            new_blocks = self.cache.allocate_blocks(blocks)
            if self.prefix is not None:
                self.prefix.hold(new_blocks)
            req.block_table = (hit.blocks if hit else []) + new_blocks
            req.num_cached = req.num_computed
            req.status = Status.RUNNING
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their order
        if not self.waiting:
            self._waited = 0
        elif len(batch) > admitted_before:  # the budget ran out mid-queue: the rest joins the next step
            self._waited = self.config.admission_delay
        return batch

    def admission_due(self) -> bool:
        """Whether waiting requests may join the next step; each False counts one step of waiting.

        A step that prefills runs eagerly, and on a big GPU its cost is mostly fixed host work (H200, 26B-A4B,
        96 decoding: ~70-120 ms for one 610-token prompt or four, against ~19 ms for a decode-only graph step).
        So while `admission_min_running` or more requests run, a prompt waits up to `admission_delay` steps for
        others to share that step, unless `admission_tokens` prompt tokens wait already. Once due it stays due
        until the queue is empty."""
        if not self.waiting:
            self._waited = 0
            return False
        cfg = self.config
        if self._waited >= cfg.admission_delay or len(self.running) < cfg.admission_min_running:
            return True
        waiting_tokens = 0
        for req in self.waiting:
            waiting_tokens += len(req.all_ids)
            if waiting_tokens >= cfg.admission_tokens:
                self._waited = cfg.admission_delay
                return True
        self._waited += 1
        return False

    @staticmethod
    def _fit(req: Request, n: int) -> int:
        """Shorten a prefill chunk so that it splits no image (an image's tokens attend to each other)."""
        return n if req.images is None else req.images.fit_chunk(req.num_computed, n)

    def _grow(self, req: Request, tokens: int) -> bool:
        """Make `req`'s block table cover `tokens`, preempting newer requests if needed; False if `req` itself
        had to be preempted."""
        need = self.cache.blocks_for(tokens) - len(req.block_table)
        while need > 0 and not self.cache.can_allocate(need):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        if need > 0:
            new_blocks = self.cache.allocate_blocks(need)
            if self.prefix is not None:
                self.prefix.hold(new_blocks)
            req.block_table += new_blocks
        return True

    def grow_decodes(self, reqs: list[Request]) -> bool:
        """Blocks for one more token of each request (the overlap scheduler's next decode step), without
        preempting anyone: False, and nothing taken, when the pool is short (the engine then schedules on the
        host, where preemption happens)."""
        needs = [max(0, self.cache.blocks_for(r.num_computed + 1) - len(r.block_table)) for r in reqs]
        if not self.cache.can_allocate(sum(needs)):
            return False
        for req, need in zip(reqs, needs):
            if need:
                new_blocks = self.cache.allocate_blocks(need)
                if self.prefix is not None:
                    self.prefix.hold(new_blocks)
                req.block_table += new_blocks
        return True

    def preempt(self, req: Request) -> None:
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free a finished or aborted request's KV and forget it."""
        self._release(req)
        if req in self.waiting:
            self.waiting.remove(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if self.prefix is not None:  # its full blocks cached, its ring parked
            self.prefix.release(req)
        else:
            self.cache.free(req.block_table, req.ring)
        req.block_table, req.ring = [], None
