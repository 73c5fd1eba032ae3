"""Per-row changes to a batch of logits before sampling: logit_bias, min_tokens, allowed_token_ids, bad words,
structured-output masks, and NaN/inf safety.

`process_logits(logits [B, V], rows)` is meant to sit just before the sampler, on the same device as the
logits, so the batched GPU sampler can call it unchanged: the work is a few indexed updates per row that
needs them, and rows that need nothing cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nvfp4kit.engine.structured_output import ConstraintState, apply_constraint_masks
from nvfp4kit.sampling import SamplingParams

if TYPE_CHECKING:
    from nvfp4kit.tokenizer import Tokenizer


@dataclass(frozen=True)
class LogitsRow:
    """What one row's processors need: its parameters, how many tokens it has generated, its stop ids."""

    params: SamplingParams
    num_output_tokens: int
    stop_ids: frozenset[int]
    constraint: ConstraintState | None = None  # structured output: the grammar's token mask

    @property
    def needs_processing(self) -> bool:
        constrained = self.constraint is not None and self.constraint.active
        return (
            bool(self.params.logit_bias)
            or self.num_output_tokens < self.params.min_tokens
            or constrained
            or has_token_bans(self.params)
        )


def host_to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the work queued there: a plain copy blocks until the
    stream is idle, which would stall the host behind an in-flight decode step. On CUDA: pinned, non-blocking."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def bad_word_token_ids(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token sequences of each bad word, as vLLM bans them: the word as written (left-stripped) and, when it
    tokenizes differently, with a leading space (so it is banned mid-text too); duplicates dropped."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = word.lstrip()
        for text in (bare, " " + bare):
            ids = tuple(tokenizer.encode(text, add_bos=False))
            if ids and ids not in sequences:
                sequences.append(ids)
    return tuple(sequences)


def has_token_bans(params: SamplingParams) -> bool:
    return params.allowed_token_ids is not None or bool(params.bad_words_token_ids)


def needs_last_token(params: SamplingParams) -> bool:
    """A multi-token bad word bans its last token after its other tokens: the row must know its last output."""
    return any(len(word) > 1 for word in params.bad_words_token_ids or ())


def banned_mask(params: SamplingParams, width: int, device: torch.device) -> torch.Tensor:
    """bool [width]: tokens this request may never sample (outside allowed_token_ids, or single-token bad
    words). Built once per request and device, kept on its params."""
    key = (width, str(device))
    mask = params.token_masks.get(key)
    if mask is None:
        if params.allowed_token_ids is None:
            host = torch.zeros(width, dtype=torch.bool)
        else:
            host = torch.ones(width, dtype=torch.bool)
            host[[t for t in params.allowed_token_ids if t < width]] = False
        single = [word[0] for word in params.bad_words_token_ids or () if len(word) == 1 and word[0] < width]
        host[single] = True
        mask = params.token_masks[key] = host_to_device(host, device)
    return mask


def _suffix_bans(rows: Sequence[LogitsRow], todo: list[int], outputs: Sequence[Sequence[int]]) -> list[tuple]:
    """(row, token) pairs that would complete a multi-token bad word: its other tokens end the row's output.
    A loop over the words (not the vocabulary)."""
    pairs = []
    for i in todo:
        output = outputs[i]
        for word in rows[i].params.bad_words_token_ids or ():
            head = len(word) - 1
            if not head or head > len(output) or output[-1] != word[-2]:  # most words end here, unsliced
                continue
            if tuple(output[len(output) - head :]) == word[:-1]:
                pairs.append((i, word[-1]))
    return pairs


def process_logits(
    logits: torch.Tensor, rows: Sequence[LogitsRow], outputs: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """Logits with each row's bias added, its stop ids masked while below min_tokens, the tokens its
    allowed_token_ids / bad words forbid masked (multi-token bad words need `outputs`, each row's generated ids)
    and its grammar's forbidden tokens masked (structured output); values made finite.

    Returns `logits` itself when no row needs anything (the common case), else a modified copy.
    """
    todo = [i for i, row in enumerate(rows) if row.needs_processing]
    if not todo:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for i in todo:
        row = rows[i]
        if row.params.logit_bias:
            ids = [t for t, _ in row.params.logit_bias if 0 <= t < vocab]
            bias = [b for t, b in row.params.logit_bias if 0 <= t < vocab]
            if ids:  # host_to_device: a plain copy would wait for the step in flight (overlap scheduling)
                index = host_to_device(torch.tensor(ids), logits.device)
                logits[i, index] += host_to_device(torch.tensor(bias, dtype=logits.dtype), logits.device)
        if row.num_output_tokens < row.params.min_tokens and row.stop_ids:
            stop = [t for t in row.stop_ids if 0 <= t < vocab]
            logits[i, host_to_device(torch.tensor(stop), logits.device)] = float("-inf")
    banning = [i for i in todo if has_token_bans(rows[i].params)]
    if banning:  # one stacked mask for all such rows: no per-token work on the host
        masks = torch.stack([banned_mask(rows[i].params, vocab, logits.device) for i in banning])
        index = host_to_device(torch.tensor(banning), logits.device)
        logits[index] = logits[index].masked_fill(masks, float("-inf"))
        pairs = _suffix_bans(rows, banning, outputs) if outputs is not None else []
        pairs = [(i, t) for i, t in pairs if t < vocab]
        if pairs:
            at = host_to_device(torch.tensor(pairs), logits.device)
            logits[at[:, 0], at[:, 1]] = float("-inf")
    constrained = [(i, rows[i].constraint) for i in todo if rows[i].constraint is not None]
    if constrained:
        apply_constraint_masks(logits, constrained)
    # a bias of +-1e30 must not turn into inf - inf = NaN later on
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf")
    )
