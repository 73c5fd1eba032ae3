"""Norm tuning: after the NVFP4 weights are fixed, fit the model's small BF16 vectors to the BF16 model.

A quantized checkpoint still stores every RMSNorm weight (input, post-attention, pre/post-feedforward, q/k
norms, the final norm) and the router's scales in BF16. Those few thousand values are free: changing them
keeps every tensor name, shape and dtype. Here they are fitted by distillation: on the calibration windows,
minimise KL(BF16 model || quantized model) of the next-token distributions, teacher-forced, with Adam on a
relative change of each vector (p = p0 * (1 + d), d starting at 0), a few epochs. Each weight's rounding
error then gets a per-channel gain correction chosen end to end instead of per layer. A slice of the
calibration windows (never the evaluation text) is kept aside: the epoch whose tuned values give the
least KL on it is written, and nothing is written if no epoch beats the untuned model there.

The quantized linears run dequantized (fp32, dense) during tuning: the same values as the NVFP4 ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader, checkpoint_files
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.layers import stored_weight
from nvfp4kit.model.loader import load_model

EPOCHS = 2
LEARNING_RATE = 2e-3  # of the relative change d (Adam steps of about 0.2% a step)
BATCH_WINDOWS = 4  # calibration windows per optimiser step
HOLDOUT = 1 / 8  # of the calibration windows, kept to pick the epoch (and to refuse a tuning that hurts)
TEACHER_CACHE = 2**31  # bytes of BF16 teacher log-probabilities kept between epochs (the rest recomputed)
TUNED_BUFFERS = ("router.proj.weight", "layer_scalar")  # dense BF16 tensors tuned besides the parameters


@dataclass
class TuneReport:
    tensors: int  # how many vectors were tuned
    kl_before: float  # mean KL on the kept-aside calibration windows
    kl_after: float
    epochs_kl: list[float] = field(default_factory=list)
    written: bool = False


def _dense(model: Gemma4Model) -> None:
    """Replace every NVFP4 weight of `model` by its dequantized fp32 copy (same values, faster on CPU)."""
    for module in model.modules():
        for name in ("weight", "gate_up", "down"):
            if getattr(module, f"{name}_packed", None) is None:
                continue
            weight = stored_weight(module, name)
            assert isinstance(weight, NVFP4Tensor)
            dense = weight.dequantize(torch.float32)
            module.register_buffer(name, dense)
            for part in ("packed", "scale", "scale_2"):
                module.register_buffer(f"{name}_{part}", None)


def _log_probs(model: Gemma4Model, tokens: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    ctx = ContiguousKVCache(model.config).step(len(tokens), device=device)
    return F.log_softmax(model(ids, ctx).float(), dim=-1)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), both log-probabilities [T, V]."""
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def tune_norms(
    src: str | Path,
    quantized: str | Path,
    samples: list[list[int]],
    *,
    epochs: int = EPOCHS,
    lr: float = LEARNING_RATE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> TuneReport:
    """Tune the BF16 vectors of the NVFP4 checkpoint `quantized` (in place) towards the BF16 checkpoint `src`
    on the calibration windows `samples`; returns what it measured on the kept-aside windows."""
    device = torch.device(device)
    teacher = load_model(src, dtype=torch.float32, device=device)
    student = load_model(quantized, dtype=torch.float32, device=device)
    _dense(student)
    prefix = student.config.weight_prefix
    reader = CheckpointReader(quantized)
    stored = set(reader.names())
    reader.close()
    params = _tunable(student, stored, prefix)
    originals = {n: p.detach().clone() for n, p in params.items()}
    deltas = {n: torch.zeros_like(p, requires_grad=True) for n, p in params.items()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    kept = max(1, int(len(samples) * HOLDOUT)) if len(samples) > 1 else 0
    check, train = [samples[i] for i in order[:kept]], [samples[i] for i in order[kept:]] or samples
    train_order = list(range(len(train)))
    targets: dict[int, torch.Tensor] = {}  # kept-aside windows' teacher log-probabilities
    cached: dict[int, torch.Tensor] = {}  # training windows', in BF16 while they fit in TEACHER_CACHE
    per_window = max(len(t) for t in samples) * student.config.vocab_size * 2

    def teacher_lp(i: int, tokens: list[int]) -> torch.Tensor:
        if i in cached:
            return cached[i].float()
        with torch.no_grad():
            lp = _log_probs(teacher, tokens, device)
        if i >= 0 and (len(cached) + 1) * per_window <= TEACHER_CACHE:
            cached[i] = lp.to(torch.bfloat16)
        return lp

    def apply() -> None:  # p = p0 * (1 + d), as a fresh tensor so autograd sees d
        for n in params:
            module, attr = _owner(student, n)
            setattr(module, attr, originals[n] * (1 + deltas[n]))

    def check_kl() -> float:
        with torch.no_grad():
            apply()
            if not check:
                return 0.0
            total = 0.0
            for i, tokens in enumerate(check):
                if i not in targets:
                    targets[i] = teacher_lp(-1, tokens)  # -1: not the training windows' cache
                total += float(_kl(targets[i], _log_probs(student, tokens, device)))
            return total / len(check)

    # the module attributes become plain tensors while tuning (nn.Parameter cannot hold a graph)
    for n in params:
        module, attr = _owner(student, n)
        delattr(module, attr)
    report = TuneReport(tensors=len(params), kl_before=check_kl(), kl_after=0.0)
    best = (report.kl_before, None)
    optimiser = torch.optim.Adam(list(deltas.values()), lr=lr)
    rng = random.Random(seed + 1)
    for epoch in range(epochs):
        rng.shuffle(train_order)
        train_kl = 0.0
        for start in range(0, len(train), BATCH_WINDOWS):
            optimiser.zero_grad()
            batch = train_order[start : start + BATCH_WINDOWS]
            for w in batch:
                apply()  # a fresh graph per window: each backward frees its own
                tokens = train[w]
                loss = _kl(teacher_lp(w, tokens), _log_probs(student, tokens, device)) / len(batch)
                loss.backward()
                train_kl += float(loss.detach()) * len(batch) / len(train)
            optimiser.step()
        kl = check_kl()
        report.epochs_kl.append(kl)
        if progress:
            print(f"tune epoch {epoch + 1}: training KL {train_kl:.5f}, kept-aside KL {kl:.5f} "
                  f"(untuned {report.kl_before:.5f})")  # fmt: skip
        if kl < best[0]:
            best = (kl, {n: d.detach().clone() for n, d in deltas.items()})
    report.kl_after = best[0]
    if best[1] is not None:
        tuned = {prefix + n: originals[n] * (1 + best[1][n]) for n in params}
        _rewrite(Path(quantized), tuned)
        report.written = True
    return report


def _tunable(model: Gemma4Model, stored: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """The model's small BF16 tensors the checkpoint stores: every norm weight and router scale (the
    parameters), the router projections and the layer scalars."""
    found = {n: p for n, p in model.named_parameters() if prefix + n in stored}
    for n, b in model.named_buffers():
        if n.endswith(TUNED_BUFFERS) and b is not None and b.is_floating_point() and prefix + n in stored:
            found[n] = b
    return found


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, attr = name.rsplit(".", 1)
    return model.get_submodule(path), attr


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace `tensors` in the checkpoint's shards, each in its stored dtype (same names, shapes, dtypes)."""
    for shard in checkpoint_files(folder):
        content = load_file(shard)
        hits = [n for n in tensors if n in content]
        if not hits:
            continue
        for n in hits:
            content[n] = tensors[n].detach().to(content[n].dtype).cpu().reshape(content[n].shape)
        save_file(content, shard, metadata={"format": "pt"})
