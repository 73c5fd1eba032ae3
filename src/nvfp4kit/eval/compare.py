"""Teacher-forced comparison of a quantized checkpoint with its reference on the same token windows.

Both models run our decoder with a `ContiguousKVCache` over each whole window in one step, so every position
sees exactly the same context. By default both models are loaded at once and compared window by window;
`low_memory=True` runs the reference first, keeps its logits in a temporary file on disk (fp32, exact), frees
it, then loads the quantized model: only one model is ever in memory.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nvfp4kit.eval.metrics import Agreement, AgreementAccumulator, token_stats
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.loader import load_model


class EvalError(ValueError):
    """The two checkpoints cannot be compared (different vocabularies, unusable settings)."""


@dataclass(frozen=True)
class EvalReport:
    ref: str
    quant: str
    agreement: Agreement
    ref_bytes: int
    quant_bytes: int
    seq_len: int
    device: str
    seconds: float
    data: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "quant": self.quant, "data": self.data, "seq_len": self.seq_len,
            **self.agreement.to_dict(), "ref_bytes": self.ref_bytes, "quant_bytes": self.quant_bytes,
            "device": self.device, "seconds": round(self.seconds, 2),
        }  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of a checkpoint's weight files (what downloading or storing the model costs)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@torch.inference_mode()
def sequence_logits(model: Gemma4Model, tokens: list[int]) -> torch.Tensor:
    """fp32 logits [T, V] of one window, every position in one forward step from an empty cache."""
    device = model.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    ctx = ContiguousKVCache(model.config).step(len(tokens), device=device)
    return model(ids, ctx).float()


def _progress(items: Iterable, *, enabled: bool, desc: str, total: int) -> Iterable:
    return tqdm(items, desc=desc, total=total, unit="seq", disable=not enabled, leave=False)


def compare_models(
    ref: Gemma4Model, quant: Gemma4Model, samples: list[list[int]], *, progress: bool = False
) -> Agreement:
    """Agreement of two loaded models on `samples` (token windows)."""
    _check_compatible(ref, quant)
    acc = AgreementAccumulator()
    for tokens in _progress(samples, enabled=progress, desc="comparing", total=len(samples)):
        ref_logits = sequence_logits(ref, tokens)
        quant_logits = sequence_logits(quant, tokens).to(ref_logits.device)
        acc.add(token_stats(ref_logits, quant_logits, torch.tensor(tokens)))
    return acc.result()


class ReferenceLogits:
    """The reference model's logits for every window, computed once, kept on disk; score many candidates."""

    def __init__(
        self, ref: Gemma4Model, samples: list[list[int]], *, folder: str | Path, progress: bool = False
    ):
        self.samples = samples
        self.vocab_size = ref.config.vocab_size
        total = sum(len(s) for s in samples)
        self.offsets = np.cumsum([0] + [len(s) for s in samples])
        self.store = np.lib.format.open_memmap(
            Path(folder) / "reference_logits.npy", mode="w+", dtype=np.float32, shape=(total, self.vocab_size)
        )
        for i, tokens in enumerate(
            _progress(samples, enabled=progress, desc="reference", total=len(samples))
        ):
            self.store[self.offsets[i] : self.offsets[i + 1]] = sequence_logits(ref, tokens).cpu().numpy()
        self.store.flush()

    def logits(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.store[self.offsets[index] : self.offsets[index + 1]]))

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        for i, tokens in enumerate(self.samples):
            yield tokens, self.logits(i)

    def score(self, quant: Gemma4Model, *, progress: bool = False) -> Agreement:
        if quant.config.vocab_size != self.vocab_size:
            raise EvalError(
                f"vocabularies differ: reference {self.vocab_size}, quantized {quant.config.vocab_size}"
            )
        acc = AgreementAccumulator()
        for tokens, ref_logits in _progress(
            self, enabled=progress, desc="comparing", total=len(self.samples)
        ):
            quant_logits = sequence_logits(quant, tokens).cpu()
            acc.add(token_stats(ref_logits, quant_logits, torch.tensor(tokens)))
        return acc.result()


def _check_compatible(ref: Gemma4Model, quant: Gemma4Model) -> None:
    if ref.config.vocab_size != quant.config.vocab_size:
        raise EvalError(
            f"vocabularies differ: reference {ref.config.vocab_size}, quantized {quant.config.vocab_size}; "
            "compare two versions of the same model"
        )


def compare_checkpoints(
    ref: str | Path,
    quant: str | Path,
    samples: list[list[int]],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    low_memory: bool = False,
    progress: bool = False,
    data: list[str] | None = None,
    fp8_lm_head: bool = False,
    load: Callable[..., Gemma4Model] = load_model,
) -> EvalReport:
    """Load both checkpoints with `load_model` and compare them on `samples`; `fp8_lm_head`: the quantized
    model computes its logits from an FP8 copy of the output projection (`Gemma4Model.use_fp8_lm_head`).
    `load(path, dtype=, device=)`: another loader (tensor parallel: `distributed.group.sequential_loader`)."""
    start = time.time()
    device = torch.device(device)

    def load_quant() -> Gemma4Model:
        model = load(quant, dtype=dtype, device=device)
        model.use_fp8_lm_head(fp8_lm_head)
        return model

    if low_memory:
        with tempfile.TemporaryDirectory(prefix="nvfp4kit-eval-") as tmp:
            ref_model = load(ref, dtype=dtype, device=device)
            reference = ReferenceLogits(ref_model, samples, folder=tmp, progress=progress)
            del ref_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            agreement = reference.score(load_quant(), progress=progress)
            del reference
    else:
        ref_model = load(ref, dtype=dtype, device=device)
        quant_model = load_quant()
        agreement = compare_models(ref_model, quant_model, samples, progress=progress)
    return EvalReport(
        ref=str(ref), quant=str(quant), agreement=agreement, ref_bytes=checkpoint_bytes(ref),
        quant_bytes=checkpoint_bytes(quant), seq_len=max(len(s) for s in samples), device=str(device),
        seconds=time.time() - start, data=list(data or []),
    )  # fmt: skip
