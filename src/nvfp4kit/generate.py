"""`LLM`: load a checkpoint and generate with the batching engine (`nvfp4kit.engine`).

`generate` runs a list of prompts together (continuous batching, chunked prefill); `stream` yields one
event per generated token of one request. On a GPU the KV cache is sized before loading, from the
checkpoint's headers, the measured memory and the memory options (`nvfp4kit.engine.sizing`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.request import TokenEvent
from nvfp4kit.engine.sizing import MemoryOptions, plan_checkpoint_memory
from nvfp4kit.model.loader import load_model, resolve_dtype
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.prompts import ImagePrompts, encode_prompt

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, event: TokenEvent) -> None:
        self.token_ids.append(event.token_id)
        self.text += event.text
        self.logprobs.append(event.logprob)
        self.top_logprobs.append(event.top_logprobs)
        self.finish_reason = event.finish_reason or self.finish_reason


class LLM:
    """`LLM(path, dtype=..., device=...)`; `llm.generate(prompts, SamplingParams(...))`.

    Memory (as vLLM's options): `gpu_memory_utilization` (fraction of the GPU's total memory the engine may
    use, default 0.90), `gpu_memory_budget` (act as if the GPU had this much, e.g. "24GiB"; replaces the
    utilization) or `kv_cache_memory` (the KV bytes themselves). On a GPU the KV cache is planned from these
    before any weight is loaded, and a model that cannot fit raises `InsufficientMemoryError` at once.
    `fp8_lm_head`: compute logits from an FP8 copy of the output projection (faster decode, slightly
    different logits; see docs/benchmarks.md).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        backend: str | None = None,
        max_model_len: int | None = None,
        engine_config: EngineConfig | None = None,
        gpu_memory_utilization: float | None = None,
        gpu_memory_budget: int | str | None = None,
        kv_cache_memory: int | str | None = None,
        fp8_lm_head: bool = False,
    ):
        self.path = Path(model)
        self.device = torch.device(device)
        engine_config = engine_config or EngineConfig()
        if max_model_len is not None:
            engine_config = replace(engine_config, max_model_len=max_model_len)
        if kv_cache_memory is not None:  # a KV size given here wins over a token count in engine_config
            engine_config = replace(engine_config, num_kv_tokens=None)
        options = MemoryOptions.parse(
            gpu_memory_utilization=gpu_memory_utilization,
            gpu_memory_budget=gpu_memory_budget,
            kv_cache_memory=kv_cache_memory if kv_cache_memory is not None else engine_config.kv_cache_memory,
        )
        model_dtype = resolve_dtype(dtype, self.device)
        self.startup_plan = plan_checkpoint_memory(
            self.path, device=self.device, model_dtype=model_dtype, config=engine_config, options=options,
            fp8_lm_head=fp8_lm_head,
        )  # fmt: skip
        if self.startup_plan is not None:
            log.info("%s", self.startup_plan.format())
            engine_config = replace(engine_config, kv_cache_memory=self.startup_plan.kv_cache_memory)
        self.model = load_model(self.path, dtype=model_dtype, device=self.device, backend=backend)
        if fp8_lm_head:
            self.model.use_fp8_lm_head()
        self.config = self.model.config
        self.tokenizer = Tokenizer(self.path)
        gen_file = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        self.engine = Engine(
            self.model, self.tokenizer, config=engine_config, generation_config=self.generation_config
        )
        self.max_model_len = self.engine.max_model_len

    def close(self) -> None:
        """Release the engine, its KV cache and CUDA graphs, and the weights; on a GPU the memory goes back to
        the driver, so another `LLM` can start in this process. Also run by `with LLM(...)` and on deletion."""
        engine, self.engine, self.model = getattr(self, "engine", None), None, None
        self.__dict__.pop("image_prompts", None)  # the vision tower, if an image loaded it
        if engine is None:
            return
        engine.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.engine is None:
            raise RuntimeError("this LLM is closed; create a new one")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: torch may already be gone
            pass

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    @functools.cached_property
    def image_prompts(self) -> ImagePrompts | None:
        """Image preprocessing and the vision tower (loaded at the first image); None for text-only checkpoints."""
        self._check_open()
        return ImagePrompts.from_checkpoint(
            self.path, dtype=self.model.dtype, device=self.device, backend=self.model.backend
        )

    def generate(
        self,
        prompts: str | Sequence[int] | dict | Sequence[str | Sequence[int] | dict],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt, batched; returns outputs in order. A prompt is a string, a list of token
        ids, or (for images, as vLLM) `{"prompt": "...<|image|>...", "multi_modal_data": {"image": image}}`
        with one `<|image|>` per image (PIL images, encoded bytes or paths; a list for several)."""
        self._check_open()
        params = params or SamplingParams()
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outputs: dict[str, RequestOutput] = {}
        for prompt in prompts:
            ids, images = encode_prompt(prompt, self.tokenizer, lambda: self.image_prompts)
            outputs[self.engine.add_request(ids, params, images=images)] = RequestOutput(ids)
        while self.engine.has_unfinished():
            for event in self.engine.step():
                outputs[event.request_id].add(event)
        return list(outputs.values())

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate one request token by token (stop ids end it; a stop string ends it and is cut from the text)."""
        self._check_open()
        request_id = self.engine.add_request(list(prompt_ids), params)
        try:
            while True:
                for event in self.engine.step():
                    if event.request_id == request_id:
                        yield event
                        if event.finish_reason:
                            return
        finally:
            self.engine.abort(request_id)
