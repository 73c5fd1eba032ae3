"""The request of `POST /v1/responses` and its translation into a chat request.

Input items become chat messages, the flat function tools chat's nested ones, `text.format` chat's
`response_format` and `reasoning.effort` Gemma 4's `enable_thinking`, so ChatHandler renders, tokenizes and
constrains the prompt exactly as it would a chat request. Errors name this route's fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nvfp4kit.serve.errors import APIError, from_validation_error
from nvfp4kit.serve.protocol import MAX_MESSAGES, ChatCompletionRequest

_EFFORTS = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
# chat's parameter names in errors raised by ChatHandler.prepare, and what this route calls them
_RENAMED = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
    "chat_template_kwargs": "reasoning",
}


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: _EFFORTS | None = None
    # accepted for clients that always send it; Gemma's thought is returned whole, never summarized
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: dict[str, Any] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # none: the served model
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]  # the bound is on items only
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    reasoning: ReasoningOptions | None = None
    text: TextOptions | None = None
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    store: bool | None = None  # nothing is ever stored, whatever this says
    service_tier: str | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    previous_response_id: str | None = None

    def check(self) -> None:
        """Rules that span fields, and the parts of the API this server does not offer; raises APIError."""
        if self.previous_response_id is not None:
            raise APIError(
                "previous_response_id is not supported: this server stores no responses; "
                "send the whole conversation in input",
                param="previous_response_id",
            )
        if self.background:
            raise APIError(
                "background responses are not supported; send background: false", param="background"
            )
        if self.truncation == "auto":
            raise APIError(
                "truncation 'auto' is not supported; shorten the input or send truncation: 'disabled'",
                param="truncation",
            )
        for entry in self.include or ():
            if entry != "reasoning.encrypted_content":  # reasoning comes back as plain text anyway
                raise APIError(f"include {entry!r} is not supported", param="include")
        if isinstance(self.input, list) and not self.input:
            raise APIError("input is empty; send a string or at least one item", param="input")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError("tool_choice needs tools; send the tools the model may call", param="tool_choice")

    @property
    def thinking(self) -> bool:
        """Any reasoning effort but 'none' and 'minimal' turns Gemma 4 thinking on (the chat route's rule for
        `reasoning_effort`); no `reasoning` leaves it off."""
        return self.reasoning is not None and self.reasoning.effort not in (None, "none", "minimal")


def _text_of(parts: Any, where: str) -> str:
    """The text of a list of text parts (a tool output, a reasoning item's content)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise APIError(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise APIError(f"{where}[{i}] must be a text part with a 'text' string", param=where)
        texts.append(part["text"])
    return "".join(texts)


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: input_text/output_text parts become text, input_image an image."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image":
            raise APIError(
                f"{where}[{i}]: send images as image_url (a URL or data URL), not file_id", param=where
            )
        else:
            raise APIError(
                f"{where}[{i}] has type {kind!r}; use input_text, output_text or input_image parts",
                param=where,
            )
    return parts


def chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's instructions and input items as chat messages.

    Consecutive function_call items join the assistant turn before them; a reasoning item's text becomes the
    `reasoning_content` of the assistant turn that follows it (the template then shows the model its thought).
    """
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    thought: str | None = None

    def assistant_turn(*, new: bool) -> dict[str, Any]:
        """The assistant message to add to: the last one, or a new one (`new`, or the last is not the model's)."""
        nonlocal thought
        last = messages[-1] if messages else None
        if new or last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            messages.append(last)
        if thought is not None:
            last["reasoning_content"], thought = thought, None
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"{where}.role must be user, system, developer or assistant", param=where)
            content = _content(item.get("content"), f"{where}.content")
            if role == "assistant":
                assistant_turn(new=True)["content"] = content  # calls after it join this turn
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            fields = {key: item.get(key) for key in ("call_id", "name", "arguments")}
            if not all(isinstance(value, str) for value in fields.values()):
                raise APIError(f"{where} needs call_id, name and arguments (strings)", param=where)
            call = {"id": fields["call_id"], "type": "function",
                    "function": {"name": fields["name"], "arguments": fields["arguments"]}}  # fmt: skip
            assistant_turn(new=False).setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(f"{where}.call_id must be the call_id of a function_call", param=where)
            output = _text_of(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            content = item.get("content") or item.get("summary") or []
            thought = _text_of(content, f"{where}.content")
        elif kind == "item_reference":
            raise APIError(f"{where}: item_reference needs stored responses, which this server has none of",
                           param=where)  # fmt: skip
        else:
            raise APIError(
                f"{where} has type {kind!r}; use message, function_call, function_call_output or reasoning items",
                param=where,
            )
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools in chat's nested shape (`strict` is dropped: calls are parsed, not
    constrained, unless tool_choice forces one)."""
    if not tools:
        return None
    nested = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise APIError(f"tools[{i}] has type {tool.get('type')!r}; this server runs function tools only",
                           param=f"tools[{i}]")  # fmt: skip
        unknown = sorted(set(tool) - _TOOL_KEYS)
        if unknown:
            raise APIError(f"tools[{i}] has unknown fields: {', '.join(unknown)}", param=f"tools[{i}]")
        function = {
            key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None
        }
        nested.append({"type": "function", "function": function})
    return nested


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str) or len(choice) != 2:
        raise APIError(
            "tool_choice must be none, auto, required or {type: 'function', name: ...}", param="tool_choice"
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(text: TextOptions | None) -> dict[str, Any] | None:
    """`text.format` in chat's `response_format` shape (json_schema's fields move under `json_schema`)."""
    spec = text.format if text is not None else None
    if spec is None or spec.get("type") == "text":
        return None
    if spec.get("type") == "json_object":
        return {"type": "json_object"}
    if spec.get("type") == "json_schema":
        if not isinstance(spec.get("schema"), dict):
            raise APIError("text.format json_schema needs a schema object", param="text.format")
        body = {key: spec[key] for key in ("name", "schema", "strict", "description") if key in spec}
        return {"type": "json_schema", "json_schema": body}
    raise APIError(
        f"text.format type {spec.get('type')!r} is not supported; use text, json_object or json_schema",
        param="text.format",
    )


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that renders and samples this response."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": chat_messages(request),
        "tools": chat_tools(request.tools),
        "tool_choice": chat_tool_choice(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls,
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "response_format": response_format(request.text),
        "chat_template_kwargs": {"enable_thinking": request.thinking},
        "stream": request.stream,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise renamed_error(from_validation_error(exc)) from exc


def renamed_error(error: APIError) -> APIError:
    """A chat-route error in this route's names (max_tokens -> max_output_tokens, messages -> input)."""
    message = re.sub(r"\b(" + "|".join(_RENAMED) + r")\b", lambda m: _RENAMED[m.group(1)], error.message)
    param = error.param
    if param is not None:
        head, _, rest = param.partition(".")
        param = _RENAMED.get(head, head) + ("." + rest if rest else "")
    return APIError(message, status=error.status, type=error.type, param=param, code=error.code)
