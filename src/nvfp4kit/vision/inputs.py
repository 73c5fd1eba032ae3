"""Image soft tokens carried by a request, and what one engine step takes from them.

A prompt with images holds, per image, `<|image>`, N image tokens, `<image|>`. `ImageInputs` keeps where the N
soft tokens sit ([start, end) prompt positions) and their embeddings from the vision tower; the model writes
those over the placeholder tokens' embeddings. With `bidirectional` (Gemma 4's `use_bidirectional_attention:
"vision"`), the soft tokens of one image attend to each other both ways on sliding-window layers (global layers
stay causal), so the scheduler never splits an image across prefill chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Span = tuple[int, int]


@dataclass(frozen=True)
class ImageInputs:
    spans: tuple[Span, ...]  # [start, end) prompt positions of each image's soft tokens, in order
    embeds: torch.Tensor  # [sum of span lengths, hidden] in the model's dtype and device, spans in order
    bidirectional: bool = True

    def __post_init__(self) -> None:
        total = sum(b - a for a, b in self.spans)
        if self.embeds.shape[0] != total:
            raise ValueError(f"{total} image token positions but {self.embeds.shape[0]} image embeddings")

    @property
    def longest(self) -> int:
        return max((b - a for a, b in self.spans), default=0)

    def check_fits(self, max_chunk: int) -> None:
        """An image's tokens are prefilled in one chunk: refuse an image longer than a chunk can hold."""
        if self.bidirectional and self.longest > max_chunk:
            raise ValueError(
                f"an image of {self.longest} soft tokens does not fit one prefill chunk of {max_chunk} tokens "
                "(raise max_num_batched_tokens and sliding_chunk, --max-num-batched-tokens / --sliding-chunk, "
                "or lower the image's soft-token budget)"
            )

    def fit_chunk(self, start: int, n: int) -> int:
        """The largest m <= n such that prefilling [start, start + m) splits no image (0: the next image needs
        more than n tokens this step)."""
        if not self.bidirectional:
            return n
        for a, b in self.spans:
            if a < start + n < b:  # the chunk would end inside this image
                return a - start if a > start else 0
        return n

    def in_chunk(self, start: int, n: int) -> list[tuple[Span, int]]:
        """Spans overlapping [start, start + n), each with the row of its first embedding in `embeds`."""
        out, row = [], 0
        for a, b in self.spans:
            if a < start + n and b > start:
                out.append(((a, b), row))
            row += b - a
        return out


class _HasImages(Protocol):
    images: ImageInputs | None
    num_computed: int


@dataclass(frozen=True)
class ImageStep:
    """One step's image tokens: flat rows and their embeddings, and each sequence's bidirectional spans."""

    rows: torch.Tensor  # [R] rows of the flat batch that are image soft tokens
    embeds: torch.Tensor  # [R, hidden]
    spans: list[tuple[Span, ...]]  # per scheduled sequence: bidirectional [start, end) position spans
    bidirectional: bool

    @property
    def override(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows, self.embeds


def image_step(batch: Sequence[tuple[_HasImages, int]]) -> ImageStep | None:
    """The image tokens in a step's chunks (call before `num_computed` advances); None when there are none."""
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    spans: list[tuple[Span, ...]] = []
    offset, bidirectional = 0, False
    for req, n in batch:
        start, seq_spans = req.num_computed, []
        if req.images is not None:
            for (a, b), row in req.images.in_chunk(start, n):
                lo, hi = max(a, start), min(b, start + n)
                rows.append(torch.arange(lo - start, hi - start) + offset)
                embeds.append(req.images.embeds[row + lo - a : row + hi - a])
                if req.images.bidirectional:
                    seq_spans.append((a, b))
                    bidirectional = True
        spans.append(tuple(seq_spans))
        offset += n
    if not rows:
        return None
    device = embeds[0].device
    return ImageStep(torch.cat(rows).to(device), torch.cat(embeds), spans, bidirectional)
