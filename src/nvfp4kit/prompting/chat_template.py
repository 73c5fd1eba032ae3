"""Render a checkpoint's own chat template safely, with OpenAI-style messages and tools.

Templates come with checkpoints and are untrusted, so they run in Jinja's immutable sandbox, with the
same whitespace rules and helpers transformers gives them (`trim_blocks`, `lstrip_blocks`, loop controls,
`raise_exception`, `tojson`, `strftime_now`), so a prompt renders here exactly as `apply_chat_template`
renders it. OpenAI messages are adapted first: tool-call arguments arrive as JSON text and are decoded
(Gemma 4's template needs a mapping), and each `role: tool` message gets the name of the call it answers.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATE = Path(__file__).resolve().parent.parent / "assets" / "chat_template.jinja"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(ValueError):
    """The messages, tools or template cannot be rendered; the message says what to fix."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "<string>"

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template {self.origin} has a syntax error: {exc}") from exc
        object.__setattr__(self, "_compiled", compiled)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for OpenAI-style `messages` (not modified) and `tools`."""
        return self.render_prepared(
            prepare_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
        )

    def render_prepared(
        self,
        prepared: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Like `render`, for messages already through `prepare_messages` (and owned by the caller)."""
        if "message.name" in self.source:
            # The template can read a tool result's name, which prepare_messages resolved: without the id it
            # skips its search of all earlier messages for the call (quadratic in a long tool loop).
            for message in prepared:
                if message.get("role") == "tool" and message.get("name"):
                    message.pop("tool_call_id", None)
        variables: dict[str, Any] = {**self.special_tokens, **(template_kwargs or {})}
        variables.update(messages=prepared, tools=tools or None, add_generation_prompt=add_generation_prompt)
        try:
            return self._compiled.render(**variables)  # type: ignore[attr-defined]
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.origin} failed on these messages: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"chat template {self.origin} failed on these messages: {exc!r}") from exc


def load_chat_template(folder: str | Path, *, fallback_to_builtin: bool = True) -> ChatTemplate:
    """The template of a checkpoint folder: `chat_template.jinja`, else `tokenizer_config.json`'s entry,
    else (if allowed) the package's Gemma 4 template."""
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tokens = {key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))}
    tokens.setdefault("bos_token", "<bos>")
    file = folder / "chat_template.jinja"
    if file.is_file():
        return ChatTemplate(file.read_text(), tokens, origin=str(file))
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if isinstance(source, str):
        return ChatTemplate(source, tokens, origin=f"{config_file} (chat_template)")
    if not fallback_to_builtin:
        raise FileNotFoundError(
            f"{folder} has no chat_template.jinja and no chat_template in tokenizer_config.json"
        )
    return ChatTemplate(BUILTIN_TEMPLATE.read_text(), tokens, origin=f"{BUILTIN_TEMPLATE} (built-in)")


def _decode_arguments(arguments: Any, where: str) -> Any:
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(
            f"{where}.function.arguments is not valid JSON ({exc.msg}): {arguments[:80]!r}"
        ) from exc
    if not isinstance(decoded, dict):
        raise ChatTemplateError(
            f"{where}.function.arguments must be a JSON object, got {type(decoded).__name__}"
        )
    return decoded


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of OpenAI messages ready for a template: arguments decoded, tool results named."""
    if not messages:
        raise ChatTemplateError("messages is empty; send at least one message")
    prepared = copy.deepcopy(messages)
    call_names: dict[str, str] = {}
    for i, message in enumerate(prepared):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        role = message["role"]
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ChatTemplateError(f"messages[{i}].{key} must be a string")
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise ChatTemplateError(f"messages[{i}].tool_calls must be a list of tool calls")
        if role == "assistant" and calls:
            for j, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ChatTemplateError(f"{where} needs a 'function' with a string 'name'")
                if call.get("id") is not None and not isinstance(call["id"], str):
                    raise ChatTemplateError(f"{where}.id must be a string")
                function["arguments"] = _decode_arguments(function.get("arguments", {}), where)
                if call.get("id"):
                    call_names[call["id"]] = function["name"]
        elif role == "tool" and not message.get("name"):
            call_id = message.get("tool_call_id")
            if call_id not in call_names:
                raise ChatTemplateError(
                    f"messages[{i}] (role tool) has tool_call_id {call_id!r}, which matches no earlier "
                    "assistant tool call; send the id of the call it answers"
                )
            message["name"] = call_names[call_id]
    return prepared


def validate_tools(tools: list[Any]) -> None:
    """Check OpenAI tool definitions; raises ChatTemplateError naming the bad entry."""
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ChatTemplateError(f"{where} must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ChatTemplateError(f"{where}.function must be an object with a name and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ChatTemplateError(
                f"{where}.function.name must be a non-empty string of letters, digits, _ - ."
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ChatTemplateError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ChatTemplateError(f"{where}.function.parameters must be a JSON schema object")
            if parameters.get("type", "object") != "object":
                raise ChatTemplateError(f"{where}.function.parameters must have type 'object'")
            properties = parameters.get("properties", {})
            if not isinstance(properties, dict):
                raise ChatTemplateError(f"{where}.function.parameters.properties must be an object")
            required = parameters.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise ChatTemplateError(f"{where}.function.parameters.required must be a list of names")
    names = [tool["function"]["name"] for tool in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ChatTemplateError(f"tools declare the same function more than once: {', '.join(duplicates)}")
