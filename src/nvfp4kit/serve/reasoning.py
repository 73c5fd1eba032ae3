"""Split Gemma 4 output into reasoning and answer.

Gemma 4 writes its reasoning as `<|channel>thought\\n...<channel|>` before the answer. The prompt itself
may already have opened the channel (after a tool result with thinking on, the generation prompt ends in
`<|channel>thought\\n`), so the parser can start inside the reasoning. A `<|tool_call>` that appears while
the channel is open ends the reasoning (the model went straight to a call); a stray `<channel|>` in the
answer is dropped. The same state machine serves streaming and non-streaming use, so both give the same
split for any chunking of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought"
TOOL_CALL_OPEN = "<|tool_call>"

_CONTENT, _LABEL, _REASONING = "content", "label", "reasoning"


@dataclass(frozen=True)
class ReasoningSplit:
    """A piece of model output divided into reasoning text and answer text."""

    reasoning: str
    content: str


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open thought channel (the model continues reasoning)."""
    return prompt.rfind(CHANNEL_OPEN) > prompt.rfind(CHANNEL_CLOSE)


def _held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class ReasoningStream:
    """Incremental splitter: feed text deltas, get reasoning and content deltas back.

    Text that might be the start of a marker is held back until it is decided, and released by `finish`.
    """

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self._state = _LABEL if starts_in_reasoning else _CONTENT
        self._pending = ""
        self.saw_reasoning = starts_in_reasoning

    def feed(self, delta: str) -> ReasoningSplit:
        self._pending += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            if not self._step(reasoning, content, final=False):
                break
        return ReasoningSplit("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningSplit:
        """Release whatever is held back; call once at the end of the output."""
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            self._step(reasoning, content, final=True)
        return ReasoningSplit("".join(reasoning), "".join(content))

    def _step(self, reasoning: list[str], content: list[str], *, final: bool) -> bool:
        """Consume what can be decided from the pending text; False when more text is needed."""
        text = self._pending
        if self._state == _LABEL:
            # Right after `<|channel>`: drop the `thought` label and one newline after it.
            if THOUGHT_LABEL.startswith(text) or text == THOUGHT_LABEL:
                if not final:
                    return False
                self._pending = ""  # output ended on the label alone: empty reasoning
                return True
            if text.startswith(THOUGHT_LABEL):
                text = text[len(THOUGHT_LABEL) :]
                if text.startswith("\n"):
                    text = text[1:]
            self._pending = text
            self._state = _REASONING
            return True
        if self._state == _REASONING:
            markers = (CHANNEL_CLOSE, TOOL_CALL_OPEN)
            sink = reasoning
        else:
            markers = (CHANNEL_OPEN, CHANNEL_CLOSE)
            sink = content
        found = [(text.find(m), m) for m in markers if m in text]
        if found:
            at, marker = min(found)
            sink.append(text[:at])
            rest = text[at + len(marker) :]
            if marker == CHANNEL_OPEN:
                self._state = _LABEL
                self.saw_reasoning = True
            elif marker == CHANNEL_CLOSE and self._state == _REASONING:
                self._state = _CONTENT
            elif marker == TOOL_CALL_OPEN:
                self._state = _CONTENT
                rest = text[at:]  # the call belongs to the answer, for the tool-call parser
            self._pending = rest
            return True
        held = 0 if final else _held_suffix(text, markers)
        sink.append(text[: len(text) - held])
        self._pending = text[len(text) - held :]
        return False if held else True


def split_reasoning(text: str, *, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """Split a whole reply into (reasoning or None when there was no thought block, content)."""
    stream = ReasoningStream(starts_in_reasoning=starts_in_reasoning)
    first = stream.feed(text)
    last = stream.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if stream.saw_reasoning else None), first.content + last.content
