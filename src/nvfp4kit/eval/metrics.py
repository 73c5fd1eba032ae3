"""Per-token agreement of a quantized model with its reference, from full-vocabulary logits.

For every position that predicts a next token: KL(ref || quant) over the whole vocabulary in fp32, whether
the two argmaxes agree, and each model's negative log-likelihood of the actual next token (for perplexity).
This is llama.cpp's `--kl-divergence` method, computed directly from both models' logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenStats:
    """Per-position values of one sequence (length = tokens - 1)."""

    kl: torch.Tensor
    top1_agree: torch.Tensor  # bool
    nll_ref: torch.Tensor
    nll_quant: torch.Tensor


def token_stats(ref_logits: torch.Tensor, quant_logits: torch.Tensor, tokens: torch.Tensor) -> TokenStats:
    """ref/quant logits [T, V] for a sequence `tokens` [T]; the last position predicts nothing and is dropped."""
    if ref_logits.shape != quant_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(quant_logits.shape)}")
    ref = torch.log_softmax(ref_logits[:-1].float(), dim=-1)
    quant = torch.log_softmax(quant_logits[:-1].float(), dim=-1)
    targets = tokens[1:].to(ref.device).long()[:, None]
    kl = (ref.exp() * (ref - quant)).sum(-1).clamp_min(0.0)  # tiny negatives are rounding
    return TokenStats(
        kl=kl.cpu(),
        top1_agree=(ref.argmax(-1) == quant.argmax(-1)).cpu(),
        nll_ref=-ref.gather(-1, targets)[:, 0].cpu(),
        nll_quant=-quant.gather(-1, targets)[:, 0].cpu(),
    )


@dataclass(frozen=True)
class Agreement:
    num_sequences: int
    num_tokens: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_ref: float
    ppl_quant: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class AgreementAccumulator:
    """Collects `TokenStats` of many sequences; `result()` summarises them (KL percentiles over all tokens)."""

    def __init__(self) -> None:
        self.parts: list[TokenStats] = []

    def add(self, stats: TokenStats) -> None:
        self.parts.append(stats)

    def result(self) -> Agreement:
        if not self.parts:
            raise ValueError("no sequences were evaluated")
        kl = torch.cat([p.kl for p in self.parts]).double().numpy()
        if kl.size == 0:
            raise ValueError(
                "the evaluated sequences have no predicted tokens (each needs at least 2 tokens)"
            )
        agree = torch.cat([p.top1_agree for p in self.parts]).double()
        nll_ref = torch.cat([p.nll_ref for p in self.parts]).double()
        nll_quant = torch.cat([p.nll_quant for p in self.parts]).double()
        return Agreement(
            num_sequences=len(self.parts),
            num_tokens=int(kl.size),
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            top1_agreement=float(agree.mean()),
            ppl_ref=math.exp(float(nll_ref.mean())),
            ppl_quant=math.exp(float(nll_quant.mean())),
        )
