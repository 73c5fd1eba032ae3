"""Request bodies of the OpenAI-compatible API, and their translation to `SamplingParams`.

Unknown fields are refused (a silently ignored field gives silently wrong results); a few fields that
change nothing for a local server (`user`, `metadata`, `store`, `service_tier`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.errors import APIError

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, *, max_tokens: int, top_logprobs: int | None, choice: int) -> SamplingParams:
        """Engine parameters for choice number `choice` (choices get seed, seed+1, ... so they differ)."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else self.seed + choice,
            stop=stops,
            stop_token_ids=tuple(self.stop_token_ids) if self.stop_token_ids else None,
            ignore_eos=self.ignore_eos,
            logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionName


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    """One message; extra keys (e.g. `reasoning_content`) pass through to the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        """Rules that span fields; raises APIError."""
        if not self.messages:
            raise APIError("messages is empty; send at least one message", param="messages")
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(
                f"response_format type {self.response_format.type!r} is not supported (no constrained decoding); "
                "use 'text'",
                param="response_format",
            )
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError("tool_choice needs tools; send the tools the model may call", param="tool_choice")

    def template_kwargs(self) -> dict[str, Any]:
        """`chat_template_kwargs`, with `reasoning_effort` mapped to `enable_thinking` unless given there."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = self.reasoning_effort not in ("none", "minimal")
        return kwargs

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def is_ids(item: Any) -> bool:
            return isinstance(item, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item
            )

        if isinstance(value, str) or is_ids(value):
            return value
        if isinstance(value, list) and (
            all(isinstance(p, str) for p in value) or all(is_ids(p) for p in value)
        ):
            return value
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        )

    def check(self) -> None:
        if self.suffix:
            raise APIError("suffix (insertion) is not supported by this model", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of must equal n (ranking extra samples is not supported)", param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError("echo with logprobs is not supported (no prompt logprobs)", param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError("prompt is empty", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def top_logprob_count(self) -> int | None:
        return self.logprobs
