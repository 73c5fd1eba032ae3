"""End-to-end distillation of an NVFP4 export: every quantization choice of the whole model tuned at once
against the full-precision model's next-token distributions on the calibration text.

The layer-local objectives (calib_round, calib_block, calib_fisher) fit each decoder layer's output; this one
fits what is finally measured: KL(teacher || student) over the vocabulary at every calibration token, the
teacher the BF16 checkpoint, the student the NVFP4 export with its codes and scales held as learnable slots.

What moves, all by Adam on one loss, the format fixed:
- each weight's rounding: calib_round's offset v in [-0.5, 0.5] (grid-step units) on top of d0, the side of
  its starting code the original weight lies on; a code moves one E2M1 step once |d0 + v| > 0.5, straight
  through. Chosen over codes re-derived from a latent weight because v = 0 is exactly the starting export
  (GPTQ's error-feedback choices are kept wherever the loss does not push), and one grid step is the largest
  move a code makes, so no scale change can silently re-round a whole block (calib_block's lesson);
- each E4M3 block scale as s0 * exp(g), rounded to E4M3 as stored in the forward, straight through;
- (TUNE_NORMS) every RMSNorm weight (BF16 tensors of the checkpoint), by steps relative to its size.
Tensor scales (weight_scale_2) and everything else stay. The teacher's log-probabilities are computed once
(fp32, all calibration windows; 2 GB for 128 x 512 tokens of an 8k vocabulary). Every `HOLDOUT`-th window
(calib_round.window_split) never trains and picks the checkpoint by its mean KL, the starting export included,
so a run that does not help writes the start back bit for bit. An expert no training token reaches gets no
gradient and keeps its codes and scales. Only decoder-layer linears are slots: an E2B/E4B export's NVFP4
per-layer-input projection is written as it was, and the student reads the BF16 one (not measured there).

Measured on the demo model after gptq-guided (docs/accuracy.md, eighth round): the training windows' KL fell by
a third in 200 steps, the kept-aside windows' rose 6%, so the start was written back; with the last checkpoint
written the held-out KL rose. Not a calibration method. Cost: each step is a forward and backward of the whole
model over BATCH_WINDOWS windows, every NVFP4 weight rebuilt from its slot (1.2-2.3 s on one CPU thread for
the 13M-parameter demo model); docs/quantize.md sizes it for 26B-A4B (it does not fit one GPU there).
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from nvfp4kit.config import load_config
from nvfp4kit.formats.modelopt import HF_QUANT_CONFIG
from nvfp4kit.formats.nvfp4 import E4M3_MAX, SCALE_MIN
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import Gemma4Model
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_flip import greedy_moves
from nvfp4kit.quant.calib_round import (
    RoundingBackend,
    RoundingSlot,
    layer_norms,
    layer_slots,
    original_weights,
    slot_tensors,
    window_split,
)
from nvfp4kit.quant.calibrate import CalibrationContext
from nvfp4kit.quant.output_dir import check_output, staged_output
from nvfp4kit.quant.shard_writer import ShardedWriter, parse_size
from nvfp4kit.tokenizer import Tokenizer

STEPS = 200  # Adam steps over the whole model
BATCH_WINDOWS = 2  # calibration windows per step
LR_ROUND = 2e-3  # on v (grid steps): at most about 0.4 of a step of travel in 200 steps
LR_SCALE = 2e-4  # on log block scale: calib_block's small step (about 4% in 200 steps)
LR_NORM = 1e-3  # on each norm weight, times that tensor's mean |w|
TUNE_NORMS = True
CHECKS = 5  # kept-aside KL measured this many times per run (and at the start)
# "adam": every element moves at about its lr a step whatever its gradient's size; "normed-sgd": SGD with
# momentum 0.9 on each tensor's gradient divided by that tensor's RMS, so elements move in proportion to
# their (averaged) gradient and a weight whose gradient is mostly noise stays near its start
OPTIMIZER = "adam"
KEEP_BEST = True  # write the checkpoint with the least kept-aside KL; False: the last one (studies)


@dataclass
class DistillSlot(RoundingSlot):
    """calib_round's slot with its block scales in the log domain (s0 * exp(g)) for Adam."""

    log_gain: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.log_gain = torch.zeros_like(self.scale, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.offset, self.log_gain]

    def block_scales(self) -> torch.Tensor:
        soft = self.scale * torch.exp(self.log_gain)
        hard = soft.clamp(SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn).float()
        hard = torch.where(self.scale > 0, hard, self.scale)  # an all-zero block keeps its 0 scale
        return hard + (soft - soft.detach())


def distill_slot(slot: RoundingSlot) -> DistillSlot:
    kwargs = {f.name: getattr(slot, f.name) for f in fields(slot) if f.init}
    return DistillSlot(**{**kwargs, "learn_scales": True})  # slot_tensors then writes the scales too


@dataclass
class DistillReport:
    kl_start: float  # mean KL on the kept-aside calibration windows, starting export
    kl_end: float  # with what was written
    best_step: int  # the step of the checkpoint written (0: the start)
    codes_moved: int
    codes: int
    scales_moved: int
    scales: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, kept-aside KL)


def _kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), both [T, V]."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - logq)).sum(-1).mean()


class Windows:
    """Calibration windows laid end to end, and the teacher's log-probabilities for every token."""

    def __init__(self, teacher: Gemma4Model, samples: list[list[int]], device: torch.device):
        self.samples, self.device = samples, device
        with torch.no_grad():
            self.teacher = [
                F.log_softmax(self.logits(teacher, [w]), dim=-1).cpu() for w in range(len(samples))
            ]

    def logits(self, model: Gemma4Model, windows: list[int]) -> torch.Tensor:
        ids = torch.tensor([t for w in windows for t in self.samples[w]], device=self.device)
        lengths = [len(self.samples[w]) for w in windows]
        ctx = CalibrationContext(model.config, lengths, chunk=0, kv_store={}, device=self.device)
        return model(ids, ctx)

    def loss(self, model: Gemma4Model, windows: list[int]) -> torch.Tensor:
        target = torch.cat([self.teacher[w] for w in windows]).to(self.device)
        return _kl(self.logits(model, windows), target)


def _student(
    src: Path, start: CheckpointReader, device: torch.device
) -> tuple[Gemma4Model, dict[int, DistillSlot], dict[str, torch.Tensor]]:
    """The BF16 model (fp32) whose NVFP4 weights are the start export's slots and whose norms are its norms;
    returns it, the slots (by weight storage) and the norm weights by checkpoint name."""
    model = load_model(src, dtype=torch.float32, device=device)
    prefix = model.config.weight_prefix
    slots: dict[int, DistillSlot] = {}
    norms: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        root = f"{prefix}layers.{i}."
        tensors = {n: start.get(n) for n in start.names() if n.startswith(root)}
        for key, slot in layer_slots(layer, i, tensors, original_weights(layer, i), prefix).items():
            slots[key] = distill_slot(slot)
        for name, weight in layer_norms(layer).items():
            norms[root + name] = weight
    norms[f"{prefix}norm.weight"] = model.norm.weight
    with torch.no_grad():
        for name, weight in norms.items():  # the start's norms (learned rounding may have tuned them)
            weight.copy_(start.get(name, dtype=torch.float32, device=device))
    model.set_backend(RoundingBackend(slots))  # type: ignore[arg-type]  # any slot with weight() will do
    return model, slots, norms


def distill_checkpoint(
    src: str | Path,
    start: str | Path,
    out: str | Path,
    *,
    calib_data: Sequence[str | Path] = (),
    num_samples: int = 128,
    seq_len: int = 512,
    device: str | torch.device = "cpu",
    steps: int | None = None,
    seed: int = 0,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    log: bool = False,
) -> DistillReport:
    """Write `out`: the NVFP4 export `start` of the BF16 checkpoint `src` with its block scales, rounding and
    (TUNE_NORMS) norm weights distilled against `src` on the calibration text; exactly `start`'s tensor names,
    shapes and dtypes. `log`: print the kept-aside KL at every check."""
    began = time.time()
    src, start, out, device = Path(src), Path(start), Path(out), torch.device(device)
    steps = STEPS if steps is None else steps
    check_output(start, out, overwrite=overwrite)
    if not (start / HF_QUANT_CONFIG).is_file():
        raise ValueError(f"{start} has no {HF_QUANT_CONFIG}: distillation starts from an NVFP4 export")
    samples = calibration_samples(Tokenizer(src), calib_data, num_samples=num_samples, seq_len=seq_len)
    teacher = load_model(src, dtype=torch.float32, device=device)
    windows = Windows(teacher, samples, device)
    del teacher
    reader = CheckpointReader(start)
    model, slots, norms = _student(src, start=reader, device=device)
    _, kept, train = window_split([len(s) for s in samples])
    judged = kept or train

    def kept_kl() -> float:
        with torch.no_grad():
            return sum(float(windows.loss(model, [w])) for w in judged) / len(judged)

    groups = [
        {"params": [s.offset for s in slots.values()], "lr": LR_ROUND},
        {"params": [s.log_gain for s in slots.values()], "lr": LR_SCALE},
    ]
    if TUNE_NORMS:
        for weight in norms.values():
            weight.requires_grad_(True)
            groups.append({"params": [weight], "lr": LR_NORM * float(weight.detach().abs().mean())})
    params = [p for g in groups for p in g["params"]]
    start_codes = {key: slot.codes.clone() for key, slot in slots.items()}  # greedy moves rewrite .codes
    best = kl_start = kept_kl()
    history, best_step = [(0, kl_start)], 0
    saved = [p.detach().clone() for p in params]
    if log:
        print(f"distill: kept-aside KL {kl_start:.5f} at the start", flush=True)
    if OPTIMIZER not in ("adam", "normed-sgd", "greedy"):
        raise ValueError(f"calib_distill.OPTIMIZER must be adam, normed-sgd or greedy, got {OPTIMIZER!r}")
    if OPTIMIZER == "greedy":  # calib_flip: codes and scales only, full-batch first-order moves
        rounds = greedy_moves(lambda w: windows.loss(model, w), list(slots.values()), train, kept_kl,
                              batch=BATCH_WINDOWS, rounds=steps, log=print if log else None)  # fmt: skip
        steps = 0
        history += [(r, kl) for r, _, kl in rounds]
        if rounds and rounds[-1][2] < best:
            best, best_step = rounds[-1][2], max(r for r, n, _ in rounds if n)
        saved = [p.detach().clone() for p in params]
    normed = OPTIMIZER == "normed-sgd"
    optimizer = torch.optim.SGD(groups, momentum=0.9) if normed else torch.optim.Adam(groups)
    rng = random.Random(seed)
    check_every = max(1, steps // CHECKS)
    recent: list[float] = []  # training KL since the last check (log)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = windows.loss(model, rng.sample(train, min(BATCH_WINDOWS, len(train))))
        loss.backward()
        recent.append(float(loss.detach()))
        if normed:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(p.grad.pow(2).mean().sqrt().clamp_min(1e-30))
        optimizer.step()
        with torch.no_grad():
            for s in slots.values():
                s.offset.clamp_(-0.5, 0.5)
        if step % check_every == 0 or step == steps:
            now = kept_kl()
            history.append((step, now))
            if log:
                print(f"distill: step {step} kept-aside KL {now:.5f}, training KL {sum(recent) / len(recent):.5f} "
                      f"({time.time() - began:.0f}s)", flush=True)  # fmt: skip
            recent = []
            if now < best or (not KEEP_BEST and step == steps):
                best, best_step, saved = now, step, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, saved):
            p.copy_(b)
            p.requires_grad_(False)
            p.grad = None
    tensors: dict[str, torch.Tensor] = {}
    prefix = model.config.weight_prefix
    for slot in slots.values():
        tensors.update(slot_tensors(slot, prefix))
    for name, weight in norms.items():
        tensors[name] = weight.detach().to(reader.get(name).dtype).cpu()
    report = _report(slots, start_codes, kl_start, best, best_step, time.time() - began, history)
    _write(start, reader, out, tensors, shard_size)
    return report


def _report(slots: dict[int, DistillSlot], start_codes: dict[int, torch.Tensor], kl_start: float, best: float, best_step: int, seconds: float,
            history: list[tuple[int, float]]) -> DistillReport:  # fmt: skip
    codes_moved = codes = scales_moved = scales = 0
    with torch.no_grad():
        for key, s in slots.items():
            codes_moved += int((s.final_codes() != start_codes[key]).sum())
            codes += s.codes.numel()
            scales_moved += int((s.block_scales() != s.scale).sum())
            scales += s.scale.numel()
    return DistillReport(
        kl_start, best, best_step, codes_moved, codes, scales_moved, scales, seconds, history
    )


def _write(
    start: Path, reader: CheckpointReader, out: Path, tensors: dict[str, torch.Tensor], shard_size: str | int
) -> None:
    """The start export with `tensors` in place of its own (same names; shapes and dtypes checked)."""
    try:
        with staged_output(out, companions_from=start) as stage:
            writer = ShardedWriter(stage, max_shard_bytes=parse_size(shard_size))
            for name in reader.names():
                old = reader.get(name)
                new = tensors.get(name, old)
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise AssertionError(
                        f"{name}: {tuple(new.shape)} {new.dtype}, export has {tuple(old.shape)} {old.dtype}"
                    )
                writer.add(name, new)
            unknown = set(tensors) - set(reader.names())
            if unknown:
                raise AssertionError(f"tensors not in {start}: {sorted(unknown)[:5]}")
            writer.close()
            for name in ("config.json", HF_QUANT_CONFIG):
                shutil.copy2(start / name, stage / name)
    finally:
        reader.close()
    load_config(out)  # the copied config still reads
