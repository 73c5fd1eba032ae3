"""The workload of `nvfp4kit bench serve`: synthetic prompts cut from the package's calibration corpus at random
offsets, with random lengths of a given mean and range (fixed seed), as single requests or K-turn sessions."""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nvfp4kit.bench.serve_load_client import Client


def sample_lengths(rng: random.Random, mean: int, spread: float, count: int) -> list[int]:
    """`count` lengths uniform in [mean * (1 - spread), mean * (1 + spread)] (at least 1)."""
    low = max(1, math.floor(mean * (1 - spread)))
    high = max(low, math.ceil(mean * (1 + spread)))
    return [rng.randint(low, high) for _ in range(count)]


def corpus_text() -> str:
    """The package's calibration corpus (prose, code, chats) without Gemma's control-token markup."""
    import re

    file = Path(__file__).resolve().parent.parent / "assets" / "calibration" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in file.read_text().splitlines() if line.strip()]
    return re.sub(r"<\|[^<>\s]{0,24}>|<[^<>\s|]{1,24}\|>", " ", "\n\n".join(texts))


@dataclass
class TokenPool:
    """Prompts cut from a token sequence at random offsets: ids (exact lengths) or text (`/detokenize`d).

    Without a `/tokenize` route the pool is the corpus's characters, about 4 per token (`approximate`)."""

    ids: list[int]
    text: str = ""
    approximate: bool = False

    def window(self, rng: random.Random, length: int) -> list[int]:
        start = rng.randrange(len(self.ids))
        reps = (start + length) // len(self.ids) + 1
        return (self.ids * reps)[start : start + length] if reps > 1 else self.ids[start : start + length]

    def text_window(self, rng: random.Random, length: int) -> str:
        start = rng.randrange(len(self.text))
        return (self.text * ((start + 4 * length) // len(self.text) + 1))[start : start + 4 * length]


@dataclass
class Session:
    """A single request (one turn) or a conversation: per turn a user prompt and an output length."""

    prompts: list  # token ids (completions) or text
    output_lens: list[int]


async def make_sessions(client: Client, pool: TokenPool, args: argparse.Namespace, count: int, seed: int):
    """`count` sessions of `args.turns` turns from a generator seeded with `seed`."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(count):
        in_lens = sample_lengths(rng, args.input_len, args.input_range, args.turns)
        out_lens = sample_lengths(rng, args.output_len, args.output_range, args.turns)
        prompts: list = []
        for length in in_lens:
            if pool.approximate:
                prompts.append(pool.text_window(rng, length))
            elif args.endpoint == "chat":
                prompts.append(await client.detokenize(pool.window(rng, length)))
            else:
                prompts.append(pool.window(rng, length))
        sessions.append(Session(prompts, out_lens))
    return sessions
