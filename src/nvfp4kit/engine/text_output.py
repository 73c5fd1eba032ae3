"""The text of one request's output, token by token: incremental detokenization, stop strings, and holding
back a tail that may still turn into a stop string.

`LLM` runs it inside `Request.append_token` (one thread does everything there); the server runs it in each
request's stream on the event loop, so the engine's worker thread only steps the model and hands out ids.
Each token costs a short-window decode and a look at the new characters only: nothing here grows with the
length of the output.
"""

from __future__ import annotations

from nvfp4kit.sampling import SamplingParams, StopStringMatcher
from nvfp4kit.tokenizer import IncrementalDetokenizer, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )
        self.stop_matcher = StopStringMatcher(params.stop) if params.stop else None
        self.include_stop = params.include_stop_str_in_output
        self.emitted = 0  # characters of detok.text already handed out

    def push(self, token_id: int, *, final: bool) -> tuple[str, bool]:
        """Add a generated token (not a stop id); returns (text to hand out now, whether a stop string ended
        the output). `final`: the last token (max_tokens), so nothing is held back."""
        self.detok.push(token_id, final=final)
        text = self.detok.text
        end, stopped = len(text), False
        matcher = self.stop_matcher
        if matcher is not None:
            hit = matcher.feed(text)  # reads only the characters added since the last token
            if hit is not None:
                end = hit + len(matcher.matched) if self.include_stop else hit
                stopped = True
            elif not final:
                end -= matcher.partial
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, stopped
