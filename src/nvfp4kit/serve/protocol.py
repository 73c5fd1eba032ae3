"""Request bodies of the OpenAI-compatible API, and their translation to `SamplingParams`.

Unknown fields are refused (a silently ignored field gives silently wrong results); a few fields that
change nothing for a local server (`user`, `metadata`, `store`, `service_tier`) are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.request_fields import VllmRequestFields

if TYPE_CHECKING:
    from nvfp4kit.engine.structured_output import Constraint

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 2048  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_MESSAGES = 10_000
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def sampling_error(exc: ValueError) -> APIError:
    """A 400 for SamplingParams' own check; its messages start with the field's name."""
    first = str(exc).split(" ", 1)[0]
    return APIError(str(exc), param=first if first.isidentifier() else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _SamplingFields(VllmRequestFields):
    """Fields shared by chat and text completions (vLLM's extra ones in `VllmRequestFields`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # like vLLM, SGLang and llama.cpp: none means the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # below 1e-5: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM: {"json" | "regex" | "choice" | "grammar": ...}
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
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
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_not_negative(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (digits), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100] (as OpenAI's), got {bias} for token {key}")
        return value

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids in stop_token_ids and logit_bias must exist; raises APIError naming the field."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids or []),
            ("logit_bias", self.logit_bias or {}),
        ):
            bad = [int(t) for t in ids if int(t) >= vocab_size]
            if bad:
                raise APIError(
                    f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param=name
                )
        self.check_ban_ids(vocab_size)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def constraint_spec(self) -> tuple[str, Any, str] | None:
        """(kind, spec, the field it came from) of the one structured-output request, or None; a 400 for two."""
        found: list[tuple[str, Any, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("json_object", None, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            body = (rf.model_extra or {}).get("json_schema")
            if not isinstance(body, dict) or not isinstance(body.get("schema", {}), (dict, bool)):
                raise APIError("response_format.json_schema must be {name, schema}", param="response_format")
            found.append(("json_schema", body.get("schema", {}), "response_format"))
        elif rf is not None and rf.type != "text":
            raise APIError(
                f"response_format type {rf.type!r} is not supported; use text, json_object or json_schema",
                param="response_format",
            )
        vllm_fields = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
        for key, value in (self.structured_outputs or {}).items():
            if key == "json_object" and value:
                found.append(("json_object", None, "structured_outputs"))
            elif key in vllm_fields and value is not None:
                spec = json.loads(value) if key == "json" and isinstance(value, str) else value
                found.append((vllm_fields[key], spec, "structured_outputs"))
            elif key not in ("json_object", "disable_any_whitespace", "whitespace_pattern"):
                raise APIError(f"structured_outputs.{key} is not supported", param="structured_outputs")
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                found.append(
                    (
                        kind,
                        json.loads(value) if isinstance(value, str) and kind == "json_schema" else value,
                        name,
                    )
                )
        if len(found) > 1:
            raise APIError(
                f"ask for one structured output, not {len(found)} ({', '.join(f[2] for f in found)})",
                param=found[1][2],
            )
        return found[0] if found else None

    def check_common(self) -> None:
        if self.stream and self.prompt_logprobs is not None:
            raise APIError(
                "prompt_logprobs cannot be streamed (as in vLLM); send stream: false", param="prompt_logprobs"
            )

    def sampling_params(
        self,
        *,
        max_tokens: int,
        top_logprobs: int | None,
        choice: int,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
        engine_fields: dict[str, Any] | None = None,
    ) -> SamplingParams:
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
            seed=None if self.seed is None else (self.seed + choice) % 2**64,
            stop=stops,
            stop_token_ids=tuple(self.stop_token_ids) if self.stop_token_ids else None,
            ignore_eos=self.ignore_eos,
            logprobs=top_logprobs,
            min_tokens=self.min_tokens,
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=bool(self.skip_special_tokens),
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
            **(engine_fields or {}),
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


class ChatMessage(BaseModel):
    """One message; extra keys (e.g. `reasoning_content`) pass through to the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        """Rules that span fields; raises APIError."""
        self.check_common()
        if not self.messages:
            raise APIError("messages is empty; send at least one message", param="messages")
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.continue_final_message and (
            self.messages[-1].role != "assistant" or self.add_generation_prompt
        ):
            raise APIError(
                "continue_final_message needs the last message to be the assistant's and "
                "add_generation_prompt: false",
                param="continue_final_message",
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
        self.check_common()
        if self.suffix:
            raise APIError("suffix (insertion) is not supported by this model", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of must equal n (ranking extra samples is not supported)", param="best_of")
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

    def prompt_logprob_count(self) -> int | None:
        """Alternatives per prompt token to compute: for `prompt_logprobs`, and for `echo` with `logprobs`."""
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(asked) if asked else None
