"""The serving engine: continuous batching over a hybrid KV cache, one `step()` at a time.

`add_request` queues a prompt; each `step` schedules a batch (decodes plus prefill chunks), runs one flat
forward pass over it, samples for every request whose prompt is fully computed, and returns the new tokens
as `TokenEvent`s. `LLM` and the async server engine are thin loops around it.

Overlap scheduling (`EngineConfig.overlap_schedule`, on by default on CUDA): a decode step's sampled tokens
stay on the device, and the next decode step is launched from them (its positions, slots and block tables do
not depend on the token values) before the host waits for them. The host then appends the tokens, checks
stops and emits the events while the GPU runs the next step, so `step()` returns the events of the step
before the one it launched. A request that finished (or was aborted) meanwhile has one extra token computed:
it is dropped, and its KV freed with the request. Steps whose inputs need the host (prefill chunks,
admissions, preemption, penalties and grammars, which read the latest token) run synchronously.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.batch_sampler import SampleRow, StepSamples, host_to_device, sample_step
from nvfp4kit.engine.cuda_graphs import DecodeGraphs, default_batch_sizes
from nvfp4kit.engine.engine_config import EngineConfig, resolve_kv_dtype, with_device_defaults
from nvfp4kit.engine.kernel_compiles import COMPILES
from nvfp4kit.engine.kv_pools import KVCache, sized_layout
from nvfp4kit.engine.logits_processors import LogitsRow, needs_last_token
from nvfp4kit.engine.prefill_graphs import PrefillGraphs, prefill_graphs_for
from nvfp4kit.engine.prompt_logprobs import PrefillSlice, record_prompt_logprobs
from nvfp4kit.engine.request import Request, Status, TokenEvent, make_request
from nvfp4kit.engine.scheduler import Scheduler, SchedulerConfig
from nvfp4kit.engine.step_stats import StepStats, StepTimer
from nvfp4kit.engine.warmup import WarmupReport, warm_up, warmup_wanted
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.inputs import ImageInputs, image_step

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "resolve_kv_dtype", "with_device_defaults"]


class Engine:
    def __init__(
        self,
        model: Gemma4Model,
        tokenizer: Tokenizer | None,
        *,
        config: EngineConfig | None = None,
        generation_config: dict | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = with_device_defaults(config or EngineConfig(), model.device)
        self.generation_config = generation_config or {}
        cfg = model.config
        self.device = model.device
        self.max_model_len = self.config.max_model_len or cfg.max_position_embeddings
        kv_dtype = resolve_kv_dtype(self.config.kv_dtype, model_dtype=model.dtype)
        chunk = self.config.max_num_batched_tokens
        self.layout, per_token, ring_bytes = sized_layout(cfg, self.config, self.max_model_len, kv_dtype)
        layout, num_blocks = self.layout, self.layout.num_blocks
        self.cache = KVCache(cfg, self.layout, kv_dtype=kv_dtype, device=self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(
                chunk,
                chunk,
                admission_delay=self.config.admission_delay or 0,
                admission_tokens=self.config.admission_tokens or chunk,
            ),
            self.cache,
            prefix_caching=self.config.prefix_caching,
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        overlap = self.config.overlap_schedule
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Launched | None = None  # a decode step launched whose tokens the host has not read
        self.step_timer = StepTimer(self.device)  # device time of each decode step, into step_stats (CUDA)
        self.overlapped_steps = 0  # decode steps launched before the host read the tokens they take
        self.step_stats = StepStats()  # steps, their wall and device time by kind (`/metrics`)
        self._step_kinds: list[str] = []  # what the step under way launched (overlap: up to two decodes)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # a tensor-parallel model captures once its ranks' caches exist (after `TensorParallelGroup.attach`)
        if not hasattr(model, "decode_graphs"):
            self.capture_decode_graphs()
        log.info(
            "KV cache: %d global-pool tokens (%.1f MiB), %d sliding rings of %d slots (%.1f MiB), dtype %s",
            num_blocks * layout.block_size, num_blocks * layout.block_size * per_token / 2**20,
            layout.max_seqs, layout.ring_size, ring_bytes / 2**20, kv_dtype,
        )  # fmt: skip
        self.warmup: WarmupReport | None = None
        if warmup_wanted(self.config.warmup, self.device):
            self.warm_up()  # eager steps: every variant the steps that fall back to eager can reach
        if not hasattr(model, "decode_graphs"):
            self.capture_prefill_graphs()
        if self.device.type == "cuda":
            COMPILES.install()
        COMPILES.mark_ready()  # a compilation from here on stalls a serving step: counted and logged

    def capture_decode_graphs(self, *, eager: bool = False) -> None:
        """Capture the decode steps in CUDA graphs when the config asks for them on a CUDA device (`eager`: the
        same fixed buffers and padding run without a graph, on any device: how the CPU tests check them). A
        tensor-parallel model's ranks each capture theirs, collectives inside: call this after
        `TensorParallelGroup.attach` (the `LLM` does)."""
        if not eager and not (self.config.cuda_graphs and self.device.type == "cuda"):
            return
        if not select_attention_backend(self.device, self.config.attention_backend).needs_metadata:
            log.info("decode runs eager: the %s attention backend cannot be captured in CUDA graphs",
                     self.config.attention_backend)  # fmt: skip
            return
        options = dict(
            batch_sizes=self.config.graph_batch_sizes or default_batch_sizes(self.config.max_num_seqs),
            max_model_len=self.max_model_len, attention_backend=self.config.attention_backend, eager=eager,
        )  # fmt: skip
        if hasattr(self.model, "decode_graphs"):  # tensor parallel (distributed/graphs.py)
            self.graphs = self.model.decode_graphs(self.cache, **options)
        else:
            self.graphs = DecodeGraphs(self.model, self.cache, **options)
        self.graphs.capture()

    def capture_prefill_graphs(self, *, eager: bool = False) -> None:
        """Capture the steps that prefill (`EngineConfig.prefill_graphs`; `eager`: the same buffers without a
        graph, any device). Not under tensor parallelism."""
        self.prefill_graphs = prefill_graphs_for(
            self.model, self.cache, self.config, self.max_model_len, eager
        )

    def warm_up(self) -> WarmupReport:
        """Compile every kernel variant a serving step can reach, on dummy tokens (`engine/warmup.py`); the KV
        pools and the prefix cache end as they were. The engine must be idle."""
        self.warmup = warm_up(self)
        return self.warmup

    def close(self) -> None:
        """Drop the CUDA graphs, the KV cache and the model: their device memory is free once nothing else
        holds them (`LLM.close` then returns it to the driver)."""
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.close()
        self.graphs = self.prefill_graphs = None
        self._in_flight = None
        self.requests.clear()
        self.scheduler = self.cache = self.model = None

    @property
    def pool_tokens(self) -> int:
        return self.layout.num_blocks * self.layout.block_size

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        images: ImageInputs | None = None,
        background: bool = False,
    ) -> str:
        """Queue a prompt; `images`: its image soft tokens (placeholders expanded, see `nvfp4kit.vision`);
        `background`: the server's own work, run with what the other requests leave (`scheduler.py`)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = min(self.max_model_len, self.pool_tokens)
        if params.max_tokens is None:  # up to the end of the context (as vLLM)
            params = replace(params, max_tokens=max(1, limit - len(prompt_ids)))
        total = len(prompt_ids) + params.max_tokens
        if total > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"context this engine can hold ({limit} tokens)"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if images is not None:
            # an image's soft tokens attend each other both ways: they share one chunk and one sliding pass
            images.check_fits(min(self.scheduler.config.max_prefill_chunk, self.cache.sliding_chunk))
        params = params.with_defaults(self.generation_config)
        req = make_request(
            request_id, prompt_ids, params, tokenizer=self.tokenizer, eos_ids=self.model.config.eos_token_ids
        )
        req.images, req.background = images, background
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:  # a decode step in flight may still hold it: its token is dropped there
            req.status, req.finish_reason = Status.FINISHED, "abort"
            self._release(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenEvent]:
        """Schedule and run one step; the tokens it finished (with the overlap scheduler: the step before's)."""
        began, self._step_kinds = time.perf_counter(), []
        events = self._step()
        seconds = time.perf_counter() - began
        # a host-scheduled decode and the one the overlap launches right after it share the step's wall time
        for kind in self._step_kinds:
            self.step_stats.add(kind, seconds / len(self._step_kinds))
        self.collect_step_times()
        return events

    def collect_step_times(self, wait: bool = False) -> None:
        """Add the device time of the decode steps the GPU has finished (`wait`: of all) to `step_stats`."""
        for kind, seconds in self.step_timer.drain(wait):
            self.step_stats.add_device(kind, seconds)

    @torch.inference_mode()
    def _step(self) -> list[TokenEvent]:
        if self._in_flight is not None:
            if any(r.status is Status.RUNNING for r in self._in_flight.requests):
                return self._overlap_step()
            self._in_flight = None  # every request of it was aborted: nothing to read
        batch = self.scheduler.schedule()
        if not batch:
            return []
        ids, seqs, sample_rows, sampled = [], [], [], []
        prefill_logprobs: list[PrefillSlice] = []  # requests that asked for prompt logprobs
        offset = 0
        images = image_step(batch)  # image soft tokens in this step's chunks (None: text only)
        for i, (req, n) in enumerate(batch):
            ids.extend(req.all_ids[req.num_computed : req.num_computed + n])
            spans = images.spans[i] if images is not None else ()
            seqs.append(SeqSlice(req.num_computed, n, offset, req.block_table, req.ring, spans))
            if req.num_computed + n == len(req.all_ids):
                sample_rows.append(offset + n - 1)
                sampled.append(req)
            if req.prompt_logprobs is not None and req.num_computed < len(req.prompt_ids):
                prefill_logprobs.append(PrefillSlice(req, req.num_computed, n, offset))
            offset += n
        for req, n in batch:
            req.num_computed += n
        if len(sampled) == len(batch) == len(ids) and images is None:  # decode only
            launched = self._launch_decode(sampled, ids, seqs)
            if self.overlap and all(_overlappable(req) for req in sampled):
                self._in_flight = launched
                return self._overlap_step()
            return self._emit(launched)
        graphs = self.prefill_graphs
        if graphs is not None and images is None and not prefill_logprobs and graphs.fits(seqs, len(ids)):
            self._step_kinds.append("prefill_graph")
            logits = graphs.run(ids, seqs, sample_rows)
        else:
            self._step_kinds.append("prefill")
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            ctx = BatchContext(
                self.model, self.cache, seqs, self.device, backend=self.config.attention_backend
            )
            override = images.override if images is not None else None
            hidden = self.model.hidden_states(input_ids, ctx, embed_override=override)
            if prefill_logprobs:
                record_prompt_logprobs(self.model, hidden, prefill_logprobs)
            logits = (
                self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)]) if sampled else None
            )
        prefix = self.scheduler.prefix
        if prefix is not None:  # a prompt computed whole: its window kept for a later turn (prefix_cache.py)
            for req, _ in batch:
                if req.num_computed == len(req.prompt_ids):
                    prefix.snapshot(req)
        if not sampled:
            return []
        return self._emit(_Launched(sampled, self._sample_on_device(sampled, logits)))

    def _launch_decode(
        self, reqs: list[Request], input_ids: list[int] | torch.Tensor, seqs: list[SeqSlice]
    ) -> _Launched:
        """Queue one decode step and its sampling on the device; nothing here waits for the device.
        `input_ids`: host ids, or the device tokens of the step before (overlap)."""
        self.step_timer.start()
        graph = self.graphs is not None and len(seqs) <= self.graphs.max_batch
        kind = "decode_graph" if graph else "decode_eager"
        self._step_kinds.append(kind)
        if graph:
            logits = self.graphs.run(input_ids, seqs)
        else:
            if not isinstance(input_ids, torch.Tensor):
                input_ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
            ctx = BatchContext(
                self.model, self.cache, seqs, self.device, backend=self.config.attention_backend
            )
            logits = self.model.logits(self.model.hidden_states(input_ids, ctx))
        launched = _Launched(reqs, self._sample_on_device(reqs, logits))
        self.step_timer.stop(kind)
        return launched

    def _overlap_step(self) -> list[TokenEvent]:
        """Launch the decode step after the one in flight (when its inputs need nothing from the host), then
        read the in-flight step's tokens and emit them while the device runs the next one."""
        current = self._in_flight
        following = self._launch_following(current)
        events = self._emit(current)
        if following is not None and not any(r.status is Status.RUNNING for r in following.requests):
            following = None  # every request of it ended: nothing to read (its KV went with them)
        self._in_flight = following
        return events

    def _launch_following(self, current: _Launched) -> _Launched | None:
        """The next decode step of `current`'s requests, fed from its device tokens; None when this step must
        be scheduled on the host (admissions, preemption, a penalty or grammar row, a longer batch)."""
        if not self.overlap:
            return None
        live = [i for i, r in enumerate(current.requests) if r.status is Status.RUNNING]
        reqs = [current.requests[i] for i in live]
        running = self.scheduler.running
        if not reqs or len(reqs) != len(running) or any(a is not b for a, b in zip(reqs, running)):
            return None
        if self.scheduler.joins_next():  # someone joins: the host schedules
            return None
        if len(reqs) > self.scheduler.config.max_num_batched_tokens or not all(map(_overlappable, reqs)):
            return None
        if not self.scheduler.grow_decodes(reqs):  # the pool is short: preemption is the host's
            return None
        seqs = [SeqSlice(r.num_computed, 1, i, r.block_table, r.ring) for i, r in enumerate(reqs)]
        for req in reqs:
            req.num_computed += 1  # the token sampled in flight: its KV is written by this step
        tokens = current.samples.tokens
        if len(live) < len(current.requests):  # an aborted request left: its row is not fed
            tokens = tokens[host_to_device(torch.tensor(live), tokens.device)]
        self.overlapped_steps += 1
        return self._launch_decode(reqs, tokens, seqs)

    def _sample_on_device(self, reqs: list[Request], logits: torch.Tensor) -> StepSamples:
        # a request launched from a token still on the device has generated one more than its output_ids hold
        lag = [req.num_computed - len(req.all_ids) for req in reqs]
        rows = [
            LogitsRow(req.params, len(req.output_ids) + extra, req.stop_ids, req.constraint)
            for req, extra in zip(reqs, lag)
        ]
        batch = [SampleRow(r.params, r.prompt_ids, r.output_ids, r.generator) for r in reqs]
        return sample_step(logits, rows, batch)

    def _emit(self, launched: _Launched) -> list[TokenEvent]:
        """Wait for one step's tokens, append them and check stops: a request that ended since the step was
        launched drops its token; a row whose sampling failed ends its own request with finish_reason "error"."""
        events = []
        failed = launched.samples.failed
        for i, (req, s) in enumerate(zip(launched.requests, launched.samples.results())):
            if req.status is Status.FINISHED:
                continue
            event = (
                req.fail(failed[i]) if s is None else req.append_token(s.token_id, s.logprob, s.top_logprobs)
            )
            events.append(event)
            if event.finish_reason:
                self._release(req)
                self.requests.pop(req.request_id, None)
        return events

    def _release(self, req: Request) -> None:
        # a failed row appended no token, though the step in flight computed one more position: keep only the
        # positions whose token is known (the prefix cache keys blocks by their tokens)
        req.num_computed = min(req.num_computed, len(req.all_ids))
        self.scheduler.finish(req)

    def stats(self) -> dict[str, float]:
        """Running and waiting count the clients' requests; `background` the background ones, either way."""
        usage = self.cache.usage
        running, waiting = self.scheduler.running, self.scheduler.waiting
        background_running, background_waiting = (sum(r.background for r in q) for q in (running, waiting))
        return {
            "running": len(running) - background_running,
            "waiting": len(waiting) - background_waiting,
            "background": background_running + background_waiting,
            "kv_global_usage": usage["global"],
            "kv_sliding_usage": usage["sliding"],
            "preemptions": self.scheduler.num_preemptions,
        }


@dataclass
class _Launched:
    """A step queued on the device: its sampled requests, in row order, and their samples."""

    requests: list[Request]
    samples: StepSamples


def _overlappable(req: Request) -> bool:
    """Whether the request's next token can be sampled before the host has its last one: not with penalties
    (they count the output) nor a grammar (it must accept the last token first)."""
    p = req.params
    penalties = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
    return not penalties and req.constraint is None and not needs_last_token(p)  # multi-token bad words
