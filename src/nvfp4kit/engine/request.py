"""A request's state in the engine, and turning its sampled tokens into text events (stop strings included)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from nvfp4kit.engine.logits_processors import bad_word_token_ids
from nvfp4kit.engine.structured_output import ConstraintState
from nvfp4kit.engine.text_output import TextOutput
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

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
    finish_reason: str | None = None  # "stop" (stop id or string), "length", "abort", "error", or None
    error: str | None = None  # with finish_reason "error": what went wrong for this request alone
    prompt_logprobs: list | None = None  # on the first event, if asked: [None, PromptLogprob, ...]
    cached_tokens: int | None = None  # on the first event: prompt tokens whose KV came from the prefix cache


@dataclass(eq=False)  # a request is itself: membership tests compare identity, never every field
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with the checkpoint's defaults already applied
    stop_ids: frozenset[int]
    text: TextOutput | None  # None: token ids only (the server detokenizes off the engine thread; benchmarks)
    generator: torch.Generator | None = None
    images: ImageInputs | None = None  # the prompt's image soft tokens (multimodal checkpoints)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    ring: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0
    prompt_logprobs: list | None = None  # [None, PromptLogprob, ...] when params.prompt_logprobs is set
    constraint: ConstraintState | None = None  # structured output: where the request is in its grammar
    num_cached: int = 0  # prompt tokens reused from the prefix cache at the last admission
    block_digests: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks
    # the server's own work (a chat history warm-up): scheduled with what clients' requests leave (scheduler.py)
    background: bool = False

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
        if self.constraint is not None:
            self.constraint.accept(token_id)
        event = self._text_event(token_id, logprob, top)
        if len(self.output_ids) == 1:
            event.cached_tokens = self.num_cached
        if len(self.output_ids) == 1 and self.prompt_logprobs is not None:
            if not self.prompt_logprobs:  # a one-token prompt: nothing was predicted
                self.prompt_logprobs.append(None)
            event.prompt_logprobs = self.prompt_logprobs
        return event

    def _text_event(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent:
        if token_id in self.stop_ids:
            return self._finish(TokenEvent(self.request_id, token_id, "", logprob, top), "stop")
        last = len(self.output_ids) >= self.params.max_tokens
        if self.text is None:
            event = TokenEvent(self.request_id, token_id, "", logprob, top)
            return self._finish(event, "length") if last else event
        delta, stopped = self.text.push(token_id, final=last)
        reason = "stop" if stopped else "length" if last else None
        event = TokenEvent(self.request_id, token_id, delta, logprob, top)
        return self._finish(event, reason) if reason else event

    def fail(self, message: str) -> TokenEvent:
        """End this request with an error (no token); the engine frees it like any finished request."""
        event = TokenEvent(self.request_id, -1, "", float("nan"), [], error=message)
        return self._finish(event, "error")

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
    """`params.detokenize=False` (or no tokenizer): events carry ids only; stop strings are then the caller's."""
    # stop_token_ids add to the model's EOS ids (as vLLM); ignore_eos drops only the EOS ids
    stop_ids = frozenset(params.stop_token_ids or ()) | (
        frozenset() if params.ignore_eos else frozenset(eos_ids)
    )
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    if params.bad_words and params.bad_words_token_ids is None and tokenizer is not None:  # LLM.generate
        params = replace(params, bad_words_token_ids=bad_word_token_ids(tokenizer, params.bad_words))
    return Request(
        request_id,
        list(prompt_ids),
        params,
        stop_ids,
        TextOutput(tokenizer, prompt_ids, params) if tokenizer and params.detokenize else None,
        generator,
        prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        constraint=params.constraint.start(tokenizer.vocab_size if tokenizer else 0)
        if params.constraint
        else None,
    )
