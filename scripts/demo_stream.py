"""Training batches for the demo model: standard-library windows mixed with fresh synthetic chats.

Chats are drawn without end by worker processes (each chunk of documents has its own seed, so the stream
is the same on any machine for one seed) and packed whole into rows; a code row is <bos> plus a random
window of the tokenized standard library.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
from collections import deque
from pathlib import Path

import numpy as np
import torch

BOS = 2
CHUNK_DOCS = 400

_worker_state: dict = {}


def _init_worker(data_dir: str, tokenizer_file: str) -> None:
    import demo_corpus
    from tokenizers import Tokenizer

    meta = json.loads((Path(data_dir) / "chat_sources.json").read_text())
    _worker_state["facts"] = [demo_corpus.DocFact(**f) for f in meta["train_facts"]]
    _worker_state["words"] = meta["words"]
    _worker_state["tokenizer"] = Tokenizer.from_file(tokenizer_file)


def _chat_chunk(seed: int) -> list[np.ndarray]:
    from demo_chats import ChatFactory

    factory = ChatFactory(random.Random(seed), _worker_state["facts"], _worker_state["words"])
    docs = [factory.document() for _ in range(CHUNK_DOCS)]
    encoded = _worker_state["tokenizer"].encode_batch(docs, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint16) for e in encoded]


class ChatStream:
    """Endless tokenized chat documents, in a fixed order for a seed, with a bounded read-ahead."""

    def __init__(self, data_dir: Path, tokenizer_file: Path, *, seed: int, workers: int):
        self.pool = mp.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(data_dir), str(tokenizer_file))
        )
        self.seed = seed
        self.next_chunk = 0
        self.in_flight: deque = deque()
        self.read_ahead = 2 * workers
        self.buffer: list[np.ndarray] = []

    def _submit(self) -> None:
        while len(self.in_flight) < self.read_ahead:
            chunk_seed = self.seed * 1_000_003 + self.next_chunk
            self.in_flight.append(self.pool.apply_async(_chat_chunk, (chunk_seed,)))
            self.next_chunk += 1

    def next_doc(self) -> np.ndarray:
        if not self.buffer:
            self._submit()
            self.buffer = list(reversed(self.in_flight.popleft().get()))
            self._submit()
        return self.buffer.pop()

    def close(self) -> None:
        self.pool.terminate()


class BatchMaker:
    def __init__(
        self, code_tokens: np.ndarray, chats: ChatStream, *, seq_len: int, code_share: float, seed: int
    ):
        self.code = code_tokens
        self.chats = chats
        self.row = seq_len + 1
        self.code_share = code_share
        self.rng = np.random.default_rng(seed)

    def _chat_row(self) -> np.ndarray:
        """Whole documents back to back; the one that crosses the row's end is cut there."""
        row, used = np.empty(self.row, dtype=np.int64), 0
        while used < self.row:
            doc = self.chats.next_doc()
            take = min(len(doc), self.row - used)
            row[used : used + take] = doc[:take]
            used += take
        return row

    def _code_row(self) -> np.ndarray:
        start = int(self.rng.integers(0, len(self.code) - self.row))
        row = self.code[start : start + self.row].astype(np.int64)
        row[0] = BOS
        return row

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = [
            self._code_row() if self.rng.random() < self.code_share else self._chat_row()
            for _ in range(batch_size)
        ]
        return torch.from_numpy(np.stack(rows))
