"""vLLM-shaped results of `LLM.generate` and `LLM.chat`: a prompt's `RequestOutput` with one `CompletionOutput`
per sample, filled event by event from the engine's `TokenEvent`s."""

from __future__ import annotations

from dataclasses import dataclass, field

from nvfp4kit.engine.request import TokenEvent


@dataclass
class CompletionOutput:
    """One sample of a prompt, as vLLM's: `index`, `text`, `token_ids`, `finish_reason`, and `logprobs`
    (per token, {token id: logprob} of the chosen token and its top alternatives) when asked."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class RequestOutput:
    """A prompt's result. vLLM's shape (`prompt`, `prompt_token_ids`, `outputs[i]`, `prompt_logprobs`), and
    the first sample's fields directly (`text`, `token_ids`, `finish_reason`, `logprobs`, `top_logprobs`)."""

    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=lambda: [CompletionOutput(0)])
    prompt_logprobs: list | None = None  # [None, PromptLogprob, ...] with SamplingParams(prompt_logprobs=k)

    def add(self, event: TokenEvent, index: int = 0, *, want_logprobs: bool = False) -> None:
        while len(self.outputs) <= index:
            self.outputs.append(CompletionOutput(len(self.outputs)))
        out = self.outputs[index]
        if event.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.token_id >= 0:  # an error or abort event carries no token
            out.token_ids.append(event.token_id)
            out.text += event.text
            out.cumulative_logprob += event.logprob
            if want_logprobs:
                out.logprobs = out.logprobs or []
                out.logprobs.append({**dict(event.top_logprobs), event.token_id: event.logprob})
        out.finish_reason = event.finish_reason or out.finish_reason
        if index == 0:
            if event.token_id >= 0:
                self.token_ids.append(event.token_id)
                self.text += event.text
                self.logprobs.append(event.logprob)
                self.top_logprobs.append(event.top_logprobs)
            self.finish_reason = event.finish_reason or self.finish_reason
