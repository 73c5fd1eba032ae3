"""vLLM's extra request fields shared by chat and text completions: token bans (`allowed_token_ids`,
`bad_words`), prompt truncation, `add_special_tokens`, token ids in the response, `cache_salt`, `request_id`
and `priority`. Each is validated here with a 400 that names it; the handlers apply them in `prepare`, off the
event loop."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from nvfp4kit.engine.logits_processors import bad_word_token_ids
from nvfp4kit.serve.errors import APIError
from nvfp4kit.tokenizer import Tokenizer

MAX_BAD_WORDS = 256
MAX_BAD_WORD_LENGTH = 2048  # characters per word
MAX_ID_LENGTH = 256  # characters of a client's request_id
MAX_SALT_LENGTH = 1024


class VllmRequestFields(BaseModel):
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None  # None: the endpoint's default (completions true, chat false)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    cache_salt: str | None = Field(None, max_length=MAX_SALT_LENGTH)
    request_id: str | None = Field(None, max_length=MAX_ID_LENGTH)
    priority: int = 0

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_not_empty(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("allowed_token_ids is empty; send at least one token id (or leave it out)")
        if value and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("bad_words")
    @classmethod
    def _bad_words_not_blank(cls, value: list[str] | None) -> list[str] | None:
        if any(not word.strip() for word in value or ()):
            raise ValueError("bad words must not be empty or whitespace")
        if any(len(word) > MAX_BAD_WORD_LENGTH for word in value or ()):
            raise ValueError(f"bad words must be at most {MAX_BAD_WORD_LENGTH} characters")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1 (the number of prompt tokens to keep), got {value}")
        return value

    @field_validator("cache_salt", "request_id")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("priority")
    @classmethod
    def _default_priority_only(cls, value: int) -> int:
        if value != 0:
            raise ValueError(
                f"priority scheduling is not enabled on this server (requests run first come, first served); "
                f"only priority 0 is accepted, got {value}"
            )
        return value

    def check_ban_ids(self, vocab_size: int) -> None:
        bad = [t for t in self.allowed_token_ids or () if t >= vocab_size]
        if bad:
            raise APIError(
                f"allowed_token_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
                param="allowed_token_ids",
            )

    def engine_fields(self, tokenizer: Tokenizer) -> dict[str, Any]:
        """SamplingParams keywords of these fields (the bad words tokenized once, here)."""
        words = tuple(self.bad_words or ())
        return {
            "allowed_token_ids": tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
            "bad_words": words,
            "bad_words_token_ids": bad_word_token_ids(tokenizer, words) if words else None,
            "cache_salt": self.cache_salt,
        }

    def truncated(self, ids: list[int], max_model_len: int, *, has_images: bool = False) -> list[int]:
        """The last `truncate_prompt_tokens` of the prompt's ids (all of them when shorter or unset)."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return ids
        if keep > max_model_len:
            raise APIError(
                f"truncate_prompt_tokens is {keep}, more than the model's context ({max_model_len} tokens)",
                param="truncate_prompt_tokens",
            )
        if len(ids) <= keep:
            return ids
        if has_images:  # cutting into an image's soft tokens would leave it half attached
            raise APIError(
                "truncate_prompt_tokens cannot cut a prompt with images", param="truncate_prompt_tokens"
            )
        return ids[-keep:]

    def response_id(self, prefix: str, default: str) -> str:
        """vLLM's response id: the prefix and the client's request_id, else the server's own id."""
        return f"{prefix}-{self.request_id}" if self.request_id is not None else default


def logprob_token(tokenizer: Tokenizer, token_id: int, *, as_id: bool) -> str:
    """A token as logprobs name it: its text, or "token_id:N" (return_tokens_as_token_ids, as vLLM)."""
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id])
