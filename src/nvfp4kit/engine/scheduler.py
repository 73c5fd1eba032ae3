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

Background requests (`Request.background`: the server's chat history warm-ups) take only what clients' requests
leave. The running clients' requests go first, then the waiting ones are admitted, then the running background
ones: a prefill chunk only in a step in which no client's prompt is computed (their first token would wait for
it), and a step with clients' decodes grows only up to `background_step_tokens` (their next token waits for the
whole step). A background request is admitted only in such a step and while no client's request waits for room
(one waiting for its twin does not count). `running` keeps the background requests last, so they are the first
preempted when blocks run short; a client's request that finds no ring or blocks preempts them too (with prefix
caching their computed full blocks stay cached, so little is lost). A background request still prefilling the
prompt a waiting client's request extends (a chat's next turn meeting its history's warm-up) becomes a client's
request: that client waits for it.
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
    admission_tokens: int = 8192
    # a background prefill chunk that joins clients' requests keeps the step within this many tokens: their next
    # token waits for the whole step (one prefill graph's size on a GPU, `prefill_graphs.py`)
    background_step_tokens: int = 256


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
        """Pick (request, number of tokens) pairs for the next step: the clients' requests first, then the
        background ones with what they leave."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        self._promote_awaited_twins()
        budget = self._continue(batch, budget, self.running[: self._foreground_end()])
        due = budget > 0 and self.joins_next()
        continued = len(batch)
        budget, stalled = self._admit(batch, budget, background=False) if due else (budget, True)
        admitted = len(batch) > continued
        quiet = not any(_prefills(req) for req, _ in batch)  # no client's prompt is computed in this step
        if batch:  # the clients' next tokens wait for this step: background chunks keep it short
            used = self.config.max_num_batched_tokens - budget
            budget = min(budget, max(0, self.config.background_step_tokens - used))
        budget = self._continue(batch, budget, self.running[self._foreground_end() :], prefill=quiet)
        if quiet and due and not stalled:  # no client's request waits for room: a background one may start
            self._admit(batch, budget, background=True)
        if not any(not req.background for req in self.waiting):
            self._waited = 0
        elif admitted:  # the budget ran out mid-queue: the rest joins the next step
            self._waited = self.config.admission_delay
        return batch

    def _continue(
        self, batch: list[tuple[Request, int]], budget: int, reqs: list[Request], *, prefill: bool = True
    ) -> int:
        """The next chunk of each running request of `reqs`, oldest first, while the budget lasts: a decode
        token, or a prefill chunk (a background request's only with `prefill`). Returns the budget left."""
        for req in reqs:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted while making room for an older request
                continue
            if req.background and not prefill and _prefills(req):
                continue
            n = self._fit(req, min(req.remaining, budget, self.config.max_prefill_chunk))
            if n == 0:  # its next image needs more of this step's budget
                continue
            if not self._grow(req, req.num_computed + n):
                continue
            batch.append((req, n))
            budget -= n
        return budget

    def _admit(self, batch: list[tuple[Request, int]], budget: int, *, background: bool) -> tuple[int, bool]:
        """Admit the waiting requests of one kind, in arrival order, while they fit; the other kind and the
        requests waiting for a twin's prefill keep their places (they do not hold back those behind them).
        Returns the budget left and whether a request of this kind was left waiting for room."""
        aside: list[Request] = []
        stalled = False
        while self.waiting and budget > 0:
            req = self.waiting.popleft()
            if req.background != background:
                aside.append(req)
                continue
            n = self._place(req, budget)
            if n == WAIT:  # its twin's prefill is under way: share it instead of repeating it
                aside.append(req)
                continue
            if n == 0:
                self.waiting.appendleft(req)
                stalled = True
                break
            self._enter(req)
            batch.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(aside))  # back at the front, in their order
        return budget, stalled

    def _place(self, req: Request, budget: int) -> int | str:
        """Give `req` its KV (cached beginning, ring, blocks for its first chunk) if they fit: the chunk's size,
        0 if they do not, `WAIT` if it waits for a twin. A client's request takes the room of background ones."""
        while True:
            hit = None
            if self.prefix is not None:
                hit = self.prefix.twin(req, self.running)
                if hit == WAIT:
                    return WAIT
                hit = hit or self.prefix.match(req)
            req.num_computed = hit.tokens if hit else 0  # the KV of a cached beginning is there already
            n = self._fit(req, min(req.remaining, budget, self.config.max_prefill_chunk))
            blocks = self.cache.blocks_for(req.num_computed + n) - (len(hit.blocks) if hit else 0)
            reclaimed = hit.reclaimed if hit else 0  # cached blocks it takes out of the free ones
            if n and self.cache.free_rings and self.cache.can_allocate(blocks + reclaimed):
                break
            req.num_computed = 0
            if not n or req.background or not self._has_background_running():
                return 0
            self.preempt(self.running[-1])  # then look again: the hit may have used its blocks
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
        return n

    def _enter(self, req: Request) -> None:
        """Into `running`: the clients' requests before the background ones, so that `running[-1]`, the first
        preempted, is a background request while one runs."""
        req.status = Status.RUNNING
        self.running.insert(len(self.running) if req.background else self._foreground_end(), req)

    def _foreground_end(self) -> int:
        """The index of the first background request in `running` (its length if none runs)."""
        if not self._has_background_running():
            return len(self.running)
        return next(i for i, r in enumerate(self.running) if r.background)

    def _has_background_running(self) -> bool:
        return bool(self.running) and self.running[-1].background

    def _promote_awaited_twins(self) -> None:
        """A background request still prefilling a prompt that a waiting client's request extends (the next turn
        of a chat whose history it warms) becomes foreground: the client waits for that prefill now."""
        if self.prefix is None:
            return
        pending = [r for r in self.running if r.background and r.num_computed < len(r.prompt_ids)]
        clients = [r for r in self.waiting if not r.background] if pending else []
        for twin in pending:
            if any(self.prefix.twin(req, [twin]) == WAIT for req in clients):
                self.running.remove(twin)
                twin.background = False
                self.running.insert(self._foreground_end(), twin)

    def joins_next(self) -> bool:
        """Whether the next step may admit a waiting request: a ring is free, or a background request's can be
        taken, and admission is due. The engine schedules that step on the host."""
        return bool(self.cache.free_rings or self._has_background_running()) and self.admission_due()

    def admission_due(self) -> bool:
        """Whether waiting requests may join the next step; each False counts one step of waiting.

        A step that prefills beside a full batch costs far more than a decode step, and its cost per prompt token
        falls as it grows (H100, 26B-A4B, ~95 decoding at concurrency 100: prefill steps of ~3.3K tokens ran at
        31.5K prompt tokens a second, of ~4.8K at 37.0K). So while `admission_min_running` or more requests run,
        a prompt waits up to `admission_delay` steps for others to share that step, unless `admission_tokens`
        prompt tokens wait already. Once due it stays due until the queue is empty. Background requests wait for
        no company (and count none)."""
        if not self.waiting:
            self._waited = 0
            return False
        cfg = self.config
        if self._waited >= cfg.admission_delay or len(self.running) < cfg.admission_min_running:
            return True
        clients = [req for req in self.waiting if not req.background]
        if not clients:
            return True
        waiting_tokens = 0
        for req in clients:
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
        """Make `req`'s block table cover `tokens`, preempting from the end of `running` if needed (background
        requests, then the newest clients' ones); False if `req` itself had to be preempted."""
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


def _prefills(req: Request) -> bool:
    """Whether the request's next chunk computes prompt (or recomputed) tokens rather than one decode token."""
    return req.remaining > 1 or not req.output_ids
