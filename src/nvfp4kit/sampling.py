"""Sampling parameters and the per-request sampler (penalties, temperature, top-k/top-p/min-p, seeds, logprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. `None` fields take the checkpoint's generation_config defaults (see `with_defaults`)."""

    max_tokens: int = 16
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0 = only the chosen)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    def with_defaults(self, generation_config: dict[str, Any]) -> SamplingParams:
        """Fill unset temperature/top_p/top_k from generation_config.json (Gemma 4: 1.0, 0.95, 64)."""
        return replace(
            self,
            temperature=self.temperature
            if self.temperature is not None
            else generation_config.get("temperature", 1.0),
            top_p=self.top_p if self.top_p is not None else generation_config.get("top_p", 1.0),
            top_k=self.top_k if self.top_k is not None else generation_config.get("top_k", 0),
        )


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """Repetition penalty over prompt + output (divide positive, multiply negative); presence/frequency over output."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks; returns logits with excluded tokens at -inf."""
    logits = logits / params.temperature
    if params.top_k and 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    prompt_ids: list[int],
    output_ids: list[int],
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Pick the next token from one row of fp32 logits. Logprobs are of the model's raw distribution."""
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    adjusted = apply_penalties(logits.float().clone(), params, prompt_ids, output_ids)
    if not params.temperature:
        token = int(torch.argmax(adjusted))
    else:
        probs = torch.softmax(filter_logits(adjusted, params), dim=-1)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    top: list[tuple[int, float]] = []
    if params.logprobs:
        values, ids = torch.topk(raw_logprobs, min(params.logprobs, raw_logprobs.numel()))
        top = list(zip(ids.tolist(), values.tolist()))
    return SampleResult(token, float(raw_logprobs[token]), top)


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing per-row to apply: such rows of a batch are sampled together by `greedy_batch`."""
    return (
        not params.temperature
        and not params.logprobs
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
    )


def greedy_batch(logits: torch.Tensor) -> list[SampleResult]:
    """Argmax and its log-probability for every row of fp32 logits [B, V], with one transfer to the host."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    pairs = torch.stack([tokens.double(), logprobs.double()], dim=1).tolist()
    return [SampleResult(int(t), lp, []) for t, lp in pairs]


def make_generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None
