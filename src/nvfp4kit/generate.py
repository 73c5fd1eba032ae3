"""`LLM`: load a checkpoint and generate, one request at a time, with a contiguous KV cache.

This is the simple, exact path (the reference the batching engine is tested against). `stream` yields one
event per generated token, which is what the server's adapter consumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4kit.model.kv_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams, make_generator, sample_token
from nvfp4kit.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TokenEvent:
    """One generated token: its id, the text it adds, its logprob, and why generation stopped (if it did)."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (eos id or stop string), "length", or None while running


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


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
    ):
        self.path = Path(model)
        self.model = load_model(self.path, dtype=dtype, device=device, backend=backend)
        self.config = self.model.config
        self.device = torch.device(device)
        self.tokenizer = Tokenizer(self.path)
        gen_file = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        self.max_model_len = max_model_len or self.config.max_position_embeddings

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids); returns outputs in order."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outputs = []
        for prompt in prompts:
            ids = self.encode(prompt)
            out = RequestOutput(ids, "", [], "length")
            for event in self.stream(ids, params):
                out.token_ids.append(event.token_id)
                out.text += event.text
                out.logprobs.append(event.logprob)
                out.top_logprobs.append(event.top_logprobs)
                if event.finish_reason:
                    out.finish_reason = event.finish_reason
            outputs.append(out)
        return outputs

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate token by token. Stop ids end generation (the stop token itself is kept in token_ids, not in
        the text); a stop string ends it and is cut from the text."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}"
            )
        params = params.with_defaults(self.generation_config)
        stop_ids = set() if params.ignore_eos else set(params.stop_token_ids or self.config.eos_token_ids)
        generator = make_generator(params.seed)
        cache = ContiguousKVCache(self.config)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        output: list[int] = []
        next_input = prompt_ids
        emitted = ""  # text already sent, to cut a stop string that spans several tokens
        for step in range(params.max_tokens):
            ids = torch.tensor(next_input, dtype=torch.long, device=self.device)
            ctx = cache.step(len(next_input), device=self.device)
            logits = self.model(ids, ctx, logits_at=torch.tensor([len(next_input) - 1], device=self.device))[
                0
            ]
            ctx.commit()
            sample = sample_token(
                logits, params, prompt_ids=prompt_ids, output_ids=output, generator=generator
            )
            output.append(sample.token_id)
            next_input = [sample.token_id]
            if sample.token_id in stop_ids:
                yield TokenEvent(sample.token_id, "", sample.logprob, sample.top_logprobs, "stop")
                return
            last = step == params.max_tokens - 1
            detok.push(sample.token_id, final=last)
            text, reason = detok.text, None
            hit = _first_stop(text, params.stop, len(emitted))
            if hit is not None:
                text, reason = text[:hit], "stop"
            elif last:
                reason = "length"
            else:  # hold back a tail that could still become a stop string
                text = text[: len(text) - _partial_stop_len(text, params.stop)]
            delta, emitted = text[len(emitted) :], text if len(text) > len(emitted) else emitted
            yield TokenEvent(sample.token_id, delta, sample.logprob, sample.top_logprobs, reason)
            if reason:
                return


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
