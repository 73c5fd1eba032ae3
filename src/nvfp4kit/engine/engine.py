"""The serving engine: continuous batching over a hybrid KV cache, one `step()` at a time.

`add_request` queues a prompt; each `step` schedules a batch (decodes plus prefill chunks), runs one flat
forward pass over it, samples for every request whose prompt is fully computed, and returns the new tokens
as `TokenEvent`s. `LLM` and the async server engine are thin loops around it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

import torch

from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.batch_sampler import SampleRow, sample_batch
from nvfp4kit.engine.cuda_graphs import DecodeGraphs, default_batch_sizes
from nvfp4kit.engine.kv_pools import KVCache, KVLayout, pool_bytes
from nvfp4kit.engine.logits_processors import LogitsRow, process_logits
from nvfp4kit.engine.prompt_logprobs import PrefillSlice, record_prompt_logprobs
from nvfp4kit.engine.request import Request, Status, TokenEvent, make_request
from nvfp4kit.engine.scheduler import Scheduler, SchedulerConfig
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.sampling import SamplingParams, greedy_batch, is_plain_greedy
from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.inputs import ImageInputs, image_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    kv_dtype: str = "auto"  # bf16, fp8_e4m3, fp8_e5m2, float32; auto = the model's compute dtype
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    num_kv_tokens: int | None = None  # global-pool capacity in tokens; default: from kv_cache_memory
    kv_cache_memory: int | None = (
        None  # bytes for both pools; default: enough for max_num_seqs * 4K tokens on CPU
    )
    k_eq_v_once: bool = True  # store the shared K=V tensor of k_eq_v layers once
    attention_backend: str | None = None  # "triton" or "torch"; default: triton on CUDA, torch on CPU
    cuda_graphs: bool = True  # replay captured decode steps on CUDA (False: eager, as --enforce-eager)
    graph_batch_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; default 1,2,4,8,16,...
    prefix_caching: bool = True  # reuse the KV of prompt beginnings computed before (engine/prefix_cache.py)


def resolve_kv_dtype(kv_dtype: str, *, model_dtype: torch.dtype) -> str:
    """The cache dtype for `EngineConfig.kv_dtype` ("auto": float32 for float32 models, else bf16)."""
    if kv_dtype != "auto":
        return kv_dtype
    return "float32" if model_dtype == torch.float32 else "bf16"


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
        self.config = config or EngineConfig()
        self.generation_config = generation_config or {}
        cfg = model.config
        self.device = model.device
        self.max_model_len = self.config.max_model_len or cfg.max_position_embeddings
        kv_dtype = resolve_kv_dtype(self.config.kv_dtype, model_dtype=model.dtype)
        chunk = self.config.max_num_batched_tokens
        layout = KVLayout(
            block_size=self.config.block_size,
            num_blocks=1,
            max_seqs=self.config.max_num_seqs,
            ring_size=cfg.sliding_window + chunk,
            k_eq_v_once=self.config.k_eq_v_once,
        )
        per_token, ring_bytes = pool_bytes(cfg, layout, kv_dtype)
        tokens = self.config.num_kv_tokens
        if tokens is None:
            budget = self.config.kv_cache_memory
            if budget is None:
                tokens = self.config.max_num_seqs * min(self.max_model_len, 4096)
            else:
                tokens = (budget - ring_bytes) // max(per_token, 1)
        num_blocks = max(1, tokens // layout.block_size)
        if self.config.kv_cache_memory is not None and tokens < layout.block_size:
            raise ValueError(
                f"kv_cache_memory={self.config.kv_cache_memory} B is too small: the sliding rings alone need "
                f"{ring_bytes} B and one global block {per_token * layout.block_size} B"
            )
        self.layout = KVLayout(
            layout.block_size, num_blocks, layout.max_seqs, layout.ring_size, layout.k_eq_v_once
        )
        self.cache = KVCache(cfg, self.layout, kv_dtype=kv_dtype, device=self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(chunk, chunk), self.cache, prefix_caching=self.config.prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.graphs: DecodeGraphs | None = None
        if self.config.cuda_graphs and self.device.type == "cuda":
            sizes = self.config.graph_batch_sizes or default_batch_sizes(self.config.max_num_seqs)
            self.graphs = DecodeGraphs(
                model, self.cache, batch_sizes=sizes, max_model_len=self.max_model_len,
                attention_backend=self.config.attention_backend,
            )  # fmt: skip
            self.graphs.capture()
        log.info(
            "KV cache: %d global-pool tokens (%.1f MiB), %d sliding rings of %d slots (%.1f MiB), dtype %s",
            num_blocks * layout.block_size, num_blocks * layout.block_size * per_token / 2**20,
            layout.max_seqs, layout.ring_size, ring_bytes / 2**20, kv_dtype,
        )  # fmt: skip

    def close(self) -> None:
        """Drop the CUDA graphs, the KV cache and the model: their device memory is free once nothing else
        holds them (`LLM.close` then returns it to the driver)."""
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = None
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
    ) -> str:
        """Queue a prompt; `images`: its image soft tokens (placeholders expanded, see `nvfp4kit.vision`)."""
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
            images.check_fits(self.scheduler.config.max_prefill_chunk)
        params = params.with_defaults(self.generation_config)
        req = make_request(
            request_id, prompt_ids, params, tokenizer=self.tokenizer, eos_ids=self.model.config.eos_token_ids
        )
        req.images = images
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            req.status, req.finish_reason = Status.FINISHED, "abort"
            self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
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
        decode_only = len(sampled) == len(batch) == len(ids) and images is None
        if decode_only and self.graphs is not None and len(batch) <= self.graphs.max_batch:
            logits = self.graphs.run(ids, seqs)
        else:
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            backend = self.config.attention_backend
            if images is not None and images.bidirectional:
                backend = "torch"  # the Triton prefill kernel is causal only; image tokens attend both ways
            ctx = BatchContext(self.model, self.cache, seqs, self.device, backend=backend)
            override = images.override if images is not None else None
            hidden = self.model.hidden_states(input_ids, ctx, embed_override=override)
            if prefill_logprobs:
                record_prompt_logprobs(self.model, hidden, prefill_logprobs)
            if not sampled:
                return []
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return self._sample(sampled, logits)

    def _sample(self, sampled: list[Request], logits: torch.Tensor) -> list[TokenEvent]:
        """Plain greedy rows together (one host transfer), the others together through the batched sampler.

        If the batch fails, its rows are sampled one by one: a row whose sampling fails ends its own request
        with finish_reason "error"; the others go on.
        """
        rows = [LogitsRow(req.params, len(req.output_ids), req.stop_ids, req.constraint) for req in sampled]
        logits = process_logits(logits, rows)
        results: list = [None] * len(sampled)
        failed: dict[int, str] = {}
        greedy = [i for i, req in enumerate(sampled) if is_plain_greedy(req.params)]
        if greedy:
            rows = (
                logits if len(greedy) == len(sampled) else logits[torch.tensor(greedy, device=logits.device)]
            )
            for i, result in zip(greedy, greedy_batch(rows)):
                results[i] = result
        others = [i for i, result in enumerate(results) if result is None]
        batch = [SampleRow(sampled[i].params, sampled[i].prompt_ids, sampled[i].output_ids, sampled[i].generator)
                 for i in others]  # fmt: skip
        if others:
            index = torch.tensor(others, device=logits.device)
            try:
                for i, result in zip(others, sample_batch(logits[index], batch)):
                    results[i] = result
            except Exception:  # find the row that broke it below, one by one
                log.exception("batched sampling failed; sampling its %d rows one by one", len(others))
        for i, sample_row in zip(others, batch):
            if results[i] is None:
                try:  # the same rules row by row: a seeded row draws the same token as in the batch
                    results[i] = sample_batch(logits[i : i + 1], [sample_row])[0]
                except Exception as exc:  # this request's parameters broke its row: end it alone
                    log.exception("sampling failed for request %s", sampled[i].request_id)
                    failed[i] = f"sampling failed: {exc}"
        events = []
        for i, (req, s) in enumerate(zip(sampled, results)):
            if i in failed:
                event = req.fail(failed[i])
            else:
                event = req.append_token(s.token_id, s.logprob, s.top_logprobs)
            events.append(event)
            if event.finish_reason:
                self.scheduler.finish(req)
                self.requests.pop(req.request_id, None)
        return events

    def stats(self) -> dict[str, float]:
        usage = self.cache.usage
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_global_usage": usage["global"],
            "kv_sliding_usage": usage["sliding"],
            "preemptions": self.scheduler.num_preemptions,
        }
