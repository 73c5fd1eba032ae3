"""Sampling parameters and the per-request sampler (penalties, temperature, top-k/top-p/min-p, seeds, logprobs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nvfp4kit.engine.structured_output import Constraint

GREEDY_TEMPERATURE = 1e-5  # temperatures below this are greedy (as vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. `None` fields take the checkpoint's generation_config defaults (see `with_defaults`)."""

    max_tokens: int | None = 16  # None: up to the end of the context
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # more stop ids, added to the model's eos ids (as vLLM)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0 = only the chosen)
    min_tokens: int = 0  # stop ids (eos and stop_token_ids) are masked until this many tokens are out
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) pairs
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    skip_special_tokens: bool = False  # leave control tokens' text out (vLLM defaults to True)
    detokenize: bool = True  # False: events carry token ids only, no text or stop strings (as vLLM)
    prompt_logprobs: int | None = None  # logprob of each prompt token (+ this many alternatives)
    n: int = 1  # samples per prompt (LLM.generate; the server makes n requests)
    allowed_token_ids: tuple[int, ...] | None = None  # only these ids may be sampled
    bad_words: tuple[str, ...] = ()  # words whose tokens may not be generated (as vLLM)
    bad_words_token_ids: tuple[tuple[int, ...], ...] | None = (
        None  # their token sequences; None: from bad_words
    )
    cache_salt: str | None = None  # mixed into the prefix-cache keys: only requests with the same salt share
    constraint: Constraint | None = field(default=None, compare=False)  # structured output (compiled grammar)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # device masks built from allowed_token_ids / bad words, once per request (logits_processors fills it)
    token_masks: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        floats = (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        )
        for name in floats:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature is not None and 0 < self.temperature < GREEDY_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # dividing by it would overflow the logits to inf
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= (self.max_tokens if self.max_tokens is not None else self.min_tokens):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if isinstance(self.logit_bias, dict):
            object.__setattr__(
                self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items())
            )
        if any(not math.isfinite(bias) for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be finite numbers")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        self._check_token_lists()

    def _check_token_lists(self) -> None:
        """allowed_token_ids and bad words as tuples (hashable, immutable), and sane."""
        if self.allowed_token_ids is not None:
            allowed = tuple(int(t) for t in self.allowed_token_ids)
            if not allowed or min(allowed) < 0:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids >= 0")
            object.__setattr__(self, "allowed_token_ids", allowed)
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if self.bad_words_token_ids is not None:
            sequences = tuple(tuple(int(t) for t in word) for word in self.bad_words_token_ids)
            if any(not word or min(word) < 0 for word in sequences):
                raise ValueError("bad_words_token_ids must be non-empty sequences of token ids >= 0")
            object.__setattr__(self, "bad_words_token_ids", sequences)

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
    adjusted = finite_logits(apply_penalties(logits.float().clone(), params, prompt_ids, output_ids))
    token = None
    if params.temperature:
        probs = torch.softmax(filter_logits(adjusted, params), dim=-1)
        total = float(probs.sum())
        if math.isfinite(total) and total > 0:  # else (nothing left, overflow): fall back to greedy
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    if token is None:
        token = int(torch.argmax(adjusted))
    top: list[tuple[int, float]] = []
    if params.logprobs:
        values, ids = torch.topk(raw_logprobs, min(params.logprobs, raw_logprobs.numel()))
        top = list(zip(ids.tolist(), values.tolist()))
    return SampleResult(token, float(raw_logprobs[token]), top)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN to -inf and +inf to the largest float, so softmax and argmax never see NaN (a penalty or bias can
    push a logit out of range; one request's extreme parameters must not poison the batch)."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing per-row to apply: such rows of a batch are sampled together by `greedy_batch`."""
    return (
        not params.temperature
        and not params.logit_bias
        and not params.min_tokens
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


class StopStringMatcher:
    """Finds stop strings in a text that only grows at its end, looking at each new character once.

    One Knuth-Morris-Pratt automaton per stop string: the state is how much of the string the text ends with,
    so a long stop list over a long output costs O(new characters x stop strings) per token, not a rescan.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self._fallback = [_kmp_table(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self._seen = 0
        self.matched = ""  # the stop string `feed` found

    def feed(self, text: str) -> int | None:
        """Read `text[seen:]` (text = all text so far); the index where the earliest stop string starts, or None."""
        first = None
        for k, stop in enumerate(self.stops):
            state, fallback = self._state[k], self._fallback[k]
            for i in range(self._seen, len(text)):
                char = text[i]
                while state and stop[state] != char:
                    state = fallback[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    start = i + 1 - len(stop)
                    if first is None or start < first:
                        first, self.matched = start, stop
                    state = fallback[state - 1]
                    break
            self._state[k] = state
        self._seen = len(text)
        return first

    @property
    def partial(self) -> int:
        """Length of the longest tail of the text read so far that may still grow into a stop string."""
        return max(self._state, default=0)


def _kmp_table(pattern: str) -> list[int]:
    """table[i]: length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table
