"""End-to-end distillation (calib_distill): zero steps write the start back bit for bit, a short run lowers the
kept-aside KL, the export has exactly ModelOpt's tensors and loads, and an expert whose output never counts
keeps its codes and scales."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.formats.nvfp4 import e2m1_decode, quantize, unpack_nibbles
from nvfp4kit.formats.safetensors_io import CheckpointReader, checkpoint_files
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_distill
from nvfp4kit.quant.calib_distill import DistillSlot, distill_checkpoint
from nvfp4kit.quant.calib_round import make_slot
from nvfp4kit.quant.calibrate import CalibrationContext


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def tensors(folder) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


def layout(folder) -> dict[str, tuple]:
    reader = CheckpointReader(folder)
    return {name: (reader.info(name).dtype, tuple(reader.info(name).shape)) for name in reader.names()}


def test_slot_starts_at_the_export_and_keeps_a_zero_scale():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    w[0, :16] = 0.0  # an all-zero block: max calibration gives it a scale the slot must not change
    q = quantize(w)
    codes = unpack_nibbles(q.packed)
    scale = q.scale.float()
    scale[0, 0] = 0.0
    slot = calib_distill.distill_slot(make_slot(codes, scale.to(torch.float8_e4m3fn), q.scale_2, w, []))
    assert isinstance(slot, DistillSlot) and slot.learn_scales
    expected = e2m1_decode(codes) * scale.repeat_interleave(16, -1) * q.scale_2
    assert torch.equal(slot.weight().detach(), expected)
    (slot.weight() * torch.randn(4, 32)).sum().backward()
    assert slot.log_gain.grad.abs().sum() > 0 and slot.offset.grad.abs().sum() > 0
    with torch.no_grad():
        slot.log_gain.fill_(0.5)
    scales = slot.block_scales().detach()
    assert scales[0, 0] == 0 and torch.all(scales[scales > 0] >= scale[scale > 0])  # up to E4M3's 448
    assert torch.any(scales > scale)


def test_zero_steps_write_the_start_bit_for_bit(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path
):
    num_samples, seq_len = calib_shape
    src, start = bf16_checkpoint("moe"), quantized("moe")
    report = distill_checkpoint(src, start, tmp_path / "d0", calib_data=[calib_file], num_samples=num_samples,
                                seq_len=seq_len, steps=0)  # fmt: skip
    assert report.codes_moved == 0 and report.scales_moved == 0 and report.best_step == 0
    ours, theirs = tensors(tmp_path / "d0"), tensors(start)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert same_bits(ours[name], t), name


def _without_expert_0(src, folder):
    """A copy of the BF16 checkpoint whose routers give expert 0 weight 0: nothing of its output counts."""
    shutil.copytree(src, folder)
    for file in checkpoint_files(folder):
        state = load_file(file)
        for name in state:
            if name.endswith("router.per_expert_scale"):
                state[name][0] = 0.0
        save_file(state, file, metadata={"format": "pt"})
    return folder


def test_short_run_lowers_kl_keeps_the_layout_and_an_unused_expert(
    bf16_checkpoint, quantized, calib_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(calib_distill, "LR_ROUND", 0.05)
    monkeypatch.setattr(calib_distill, "LR_SCALE", 0.01)
    monkeypatch.setattr(calib_distill, "CHECKS", 2)
    src = _without_expert_0(bf16_checkpoint("moe"), tmp_path / "src")
    start = quantized("moe")
    out = tmp_path / "distilled"
    # 16 windows: every 8th (2) kept aside to pick the checkpoint
    report = distill_checkpoint(
        src, start, out, calib_data=[calib_file], num_samples=16, seq_len=24, steps=30
    )
    assert report.kl_end < report.kl_start and report.best_step > 0, report
    assert report.codes_moved > 0 and report.scales_moved > 0, report
    assert layout(out) == layout(start)  # ModelOpt's names, dtypes and shapes, nothing added
    ours, theirs = tensors(out), tensors(start)
    expert_0 = [n for n in theirs if ".experts.0." in n and n.endswith((".weight", ".weight_scale"))]
    assert expert_0 and all(same_bits(ours[n], theirs[n]) for n in expert_0)
    assert all(
        torch.equal(ours[n], theirs[n]) for n in theirs if n.endswith(("weight_scale_2", "input_scale"))
    )
    scales = [ours[n].float() for n in ours if n.endswith(".weight_scale")]
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scales)
    model = load_model(out, dtype=torch.float32)  # our loader, strict
    ids = torch.arange(1, 9)
    ctx = CalibrationContext(model.config, [8], chunk=0, kv_store={}, device=ids.device)
    with torch.no_grad():
        assert torch.isfinite(model(ids, ctx)).all()
