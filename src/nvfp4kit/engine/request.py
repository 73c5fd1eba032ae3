"""A request's state in the engine, and turning its sampled tokens into text events (stop strings included)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from nvfp4kit.vision.inputs import ImageInputs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """One generated token: its id, the text it adds, its logprob, and why generation stopped (if it did)."""

    request_id: str
    token_id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (stop id or string), "length", "abort", or None while running


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with the checkpoint's defaults already applied
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None  # None: token ids only (benchmarks), no text or stop strings
    generator: torch.Generator | None = None
    images: ImageInputs | None = None  # the prompt's image soft tokens (multimodal checkpoints)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    ring: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    emitted: str = ""  # text already handed out
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    def append_token(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent:
        """Record a sampled token and decide whether the request is done; returns the text it adds."""
        self.output_ids.append(token_id)
        if token_id in self.stop_ids:
            return self._finish(TokenEvent(self.request_id, token_id, "", logprob, top), "stop")
        last = len(self.output_ids) >= self.params.max_tokens
        if self.detok is None:
            event = TokenEvent(self.request_id, token_id, "", logprob, top)
            return self._finish(event, "length") if last else event
        self.detok.push(token_id, final=last)
        text = self.detok.text
        stops = self.params.stop
        hit = _first_stop(text, stops, len(self.emitted))
        reason = None
        if hit is not None:
            text, reason = text[:hit], "stop"
        elif last:
            reason = "length"
        else:  # hold back a tail that may still turn into a stop string
            text = text[: len(text) - _partial_stop_len(text, stops)]
        delta = text[len(self.emitted) :]
        self.emitted = max(self.emitted, text, key=len)
        event = TokenEvent(self.request_id, token_id, delta, logprob, top)
        return self._finish(event, reason) if reason else event

    def _finish(self, event: TokenEvent, reason: str) -> TokenEvent:
        self.status, self.finish_reason, event.finish_reason = Status.FINISHED, reason, reason
        return event


def make_request(
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None,
    eos_ids: tuple[int, ...],
) -> Request:
    stop_ids = frozenset() if params.ignore_eos else frozenset(params.stop_token_ids or eos_ids)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return Request(
        request_id,
        list(prompt_ids),
        params,
        stop_ids,
        IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer else None,
        generator,
    )


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
