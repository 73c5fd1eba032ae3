"""Log-probabilities of the prompt's own tokens, computed during prefill (vLLM's `prompt_logprobs`, and
`echo` + `logprobs` on /v1/completions that lm-eval's loglikelihood tasks use).

Each prefill chunk's hidden states already exist; for a request that asked, the logits of its chunk rows
are computed a few rows at a time (so memory stays at ROWS x vocab) and the logprob of each next prompt
token kept, with its rank and the top alternatives. These are the numbers a teacher-forced forward gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS = 64  # logits rows at a time: 64 x 262,144 fp32 = 64 MiB for Gemma 4


@dataclass
class PromptLogprob:
    """One prompt token's entry: its logprob and rank under the model, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class PrefillSlice:
    """Rows [offset, offset + count) of a step's hidden states hold prompt positions [start, start + count)."""

    request: object  # engine.request.Request (its prompt_ids, params.prompt_logprobs, prompt_logprobs list)
    start: int
    count: int
    offset: int


def record_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, slices: list[PrefillSlice]) -> None:
    """Append to each slice's request the entries of the prompt tokens this chunk predicts."""
    for piece in slices:
        req = piece.request
        entries: list = req.prompt_logprobs
        prompt = req.prompt_ids
        if piece.start == 0 and not entries:
            entries.append(None)  # the first token has nothing before it
        # position p predicts prompt token p + 1; the last prompt position predicts the first output token
        end = min(piece.start + piece.count, len(prompt) - 1)
        first = max(piece.start, len(entries) - 1)  # positions already done before a preemption are skipped
        top_k = req.params.prompt_logprobs or 0
        for lo in range(first, end, ROWS):
            hi = min(end, lo + ROWS)
            rows = hidden[piece.offset + lo - piece.start : piece.offset + hi - piece.start]
            logprobs = torch.log_softmax(model.logits(rows).float(), dim=-1)
            targets = torch.tensor(prompt[lo + 1 : hi + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > chosen).sum(dim=1) + 1
            top_values, top_ids = logprobs.topk(top_k, dim=-1) if top_k else (None, None)
            chosen_list, rank_list = chosen[:, 0].tolist(), ranks.tolist()
            tops = (
                [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_values.tolist())]
                if top_k
                else [[] for _ in chosen_list]
            )
            for j, (lp, rank, top) in enumerate(zip(chosen_list, rank_list, tops)):
                entries.append(PromptLogprob(prompt[lo + 1 + j], lp, rank, top))
