"""Chat prompts whose client text stays text: control tokens come only from the template's own markup.

A client may write `<|turn>`, `<turn|>`, `<|"|>` or `<bos>` inside a message; tokenizing the rendered prompt
as one string would turn that into the control ids, so one message could forge a whole conversation or a
tool result could close its own quoting. So before rendering, every control-token text inside client strings
(message content, reasoning, names, tool-call arguments, tool results, tool declarations) is wrapped in two
private-use marker characters that occur nowhere else in the request or the template; after rendering, the
wrapped spans are tokenized as ordinary characters (`Tokenizer.encode_as_text`) and the rest as usual.
Nothing is removed or escaped in the text the model reads: `<|turn>` typed by a user reaches the model as
the characters `<|turn>`, not as the control token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from nvfp4kit.prompting.chat_template import ChatTemplate, ChatTemplateError, prepare_messages
from nvfp4kit.tokenizer import Tokenizer

_PRIVATE_USE = range(0xE000, 0xF8FF, 2)
TURN_END = "<turn|>"


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the prompt as the model reads it (markers removed)
    ids: list[int]


def render_chat_prompt(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any],
) -> RenderedPrompt:
    """Render `messages` and `tools` with `template` and tokenize them, client text as plain text.

    Raises ChatTemplateError for messages the template cannot render.
    """
    prepared = prepare_messages(messages)
    pattern = tokenizer.special_token_pattern
    needs_marks = _contains(prepared, pattern) or _contains(tools, pattern)
    if not needs_marks:
        text = template.render_prepared(
            prepared,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
        )
        return RenderedPrompt(text, tokenizer.encode(text))
    opening, closing = _free_markers(json.dumps([prepared, tools], ensure_ascii=False) + template.source)

    def mark(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: opening + m.group() + closing, value)
        if isinstance(value, dict):
            return {mark(k): mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    marked_messages = [{k: (v if k == "role" else mark(v)) for k, v in m.items()} for m in prepared]
    text = template.render_prepared(
        marked_messages,
        tools=mark(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        template_kwargs=template_kwargs,
    )
    return _tokenize_marked(tokenizer, text, opening, closing)


def _tokenize_marked(tokenizer: Tokenizer, text: str, opening: str, closing: str) -> RenderedPrompt:
    """Markup between the marked spans tokenized as usual, the spans as text; a marker the template cut in
    two (e.g. by splitting content at `<channel|>`) is dropped and its half-span counts as markup text."""
    spans = re.compile(re.escape(opening) + "(.*?)" + re.escape(closing), re.DOTALL)
    stray = re.compile(f"[{re.escape(opening)}{re.escape(closing)}]")
    pieces: list[str] = []
    ids: list[int] = []
    start = 0
    for match in spans.finditer(text):
        markup = stray.sub("", text[start : match.start()])
        if markup:
            ids += tokenizer.encode(markup, add_bos=not ids and not pieces)
        ids += tokenizer.encode_as_text(match.group(1))
        pieces += [markup, match.group(1)]
        start = match.end()
    markup = stray.sub("", text[start:])
    ids += tokenizer.encode(markup, add_bos=False) if markup else []
    pieces.append(markup)
    return RenderedPrompt("".join(pieces), ids)


def _contains(value: Any, pattern: re.Pattern[str]) -> bool:
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(_contains(k, pattern) or _contains(v, pattern) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains(v, pattern) for v in value)
    return False


def _free_markers(text: str) -> tuple[str, str]:
    """Two private-use characters that do not occur in `text` (so a client cannot forge a marker)."""
    used = set(text)
    for code in _PRIVATE_USE:
        if chr(code) not in used and chr(code + 1) not in used:
            return chr(code), chr(code + 1)
    raise ChatTemplateError("the messages use every private-use character; no text marker is left")


def reopen_last_turn(tokenizer: Tokenizer, rendered: RenderedPrompt) -> RenderedPrompt:
    """The prompt without the end of its last (assistant) turn, so the model continues that message
    (`continue_final_message`). Raises ChatTemplateError if the prompt does not end with a closed turn."""
    for ending in (TURN_END + "\n", TURN_END):
        ending_ids = tokenizer.encode(ending, add_bos=False)
        if rendered.text.endswith(ending) and rendered.ids[-len(ending_ids) :] == ending_ids:
            return RenderedPrompt(rendered.text[: -len(ending)], rendered.ids[: -len(ending_ids)])
    raise ChatTemplateError(
        f"continue_final_message: the chat template does not end the last assistant message with {TURN_END!r} "
        "(a message with tool calls cannot be continued)"
    )
