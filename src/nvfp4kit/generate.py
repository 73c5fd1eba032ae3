"""`LLM`: load a checkpoint and generate with the batching engine (`nvfp4kit.engine`).

`generate` runs a list of prompts together (continuous batching, chunked prefill); `stream` yields one
event per generated token of one request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.request import TokenEvent
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer


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
    """`LLM(path, dtype=..., device=...)`; `llm.generate(prompts, SamplingParams(...))`."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        backend: str | None = None,
        max_model_len: int | None = None,
        engine_config: EngineConfig | None = None,
    ):
        self.path = Path(model)
        self.model = load_model(self.path, dtype=dtype, device=device, backend=backend)
        self.config = self.model.config
        self.device = torch.device(device)
        self.tokenizer = Tokenizer(self.path)
        gen_file = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        engine_config = engine_config or EngineConfig()
        if max_model_len is not None:
            engine_config = EngineConfig(**{**engine_config.__dict__, "max_model_len": max_model_len})
        self.engine = Engine(
            self.model, self.tokenizer, config=engine_config, generation_config=self.generation_config
        )
        self.max_model_len = self.engine.max_model_len

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids), batched; returns outputs in order."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outputs: dict[str, RequestOutput] = {}
        for prompt in prompts:
            ids = self.encode(prompt)
            outputs[self.engine.add_request(ids, params)] = RequestOutput(ids)
        while self.engine.has_unfinished():
            for event in self.engine.step():
                outputs[event.request_id].add(event)
        return list(outputs.values())

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate one request token by token (stop ids end it; a stop string ends it and is cut from the text)."""
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
