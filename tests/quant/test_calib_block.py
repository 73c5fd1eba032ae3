"""Block-scale reconstruction (calib_block): starts exactly at the given weights, stores E4M3 scales, lowers a
layer's kept-aside output error, leaves an expert no token reaches alone, and writes max's layout."""

from __future__ import annotations

import torch

from nvfp4kit.eval import compare_checkpoints, load_samples
from nvfp4kit.formats.nvfp4 import e2m1_decode, e2m1_encode, quantize, unpack_nibbles
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_block, calib_refine
from nvfp4kit.quant.calib_block import ScaleSlot, learn_block_scales
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.quant.calib_round import Member
from nvfp4kit.quant.calibrate import CalibrationContext
from nvfp4kit.tokenizer import Tokenizer


def _slot(w: torch.Tensor, reround: bool) -> tuple[ScaleSlot, object]:
    q = quantize(w)
    codes = unpack_nibbles(q.packed)
    return ScaleSlot(e2m1_decode(codes), codes, q.scale.float(), q.scale_2.float(), [], reround), q


def test_slot_starts_at_the_given_weight_and_stores_e4m3_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for reround in (False, True):
        slot, q = _slot(w, reround)
        assert torch.equal(slot.weight().detach(), q.dequantize())
        codes, scales = slot.final()
        assert torch.equal(codes, unpack_nibbles(q.packed)) and torch.equal(scales, q.scale)
        (slot.weight() * torch.randn(8, 64)).sum().backward()
        assert slot.log_gain.grad is not None and slot.log_gain.grad.abs().sum() > 0
        with torch.no_grad():
            slot.log_gain.fill_(0.3)
        codes, scales = slot.final()
        assert scales.dtype == torch.float8_e4m3fn and torch.all(scales.float() >= q.scale.float())
        if reround:  # the nearest code to the starting weight under the new scale
            start = e2m1_decode(unpack_nibbles(q.packed)) * q.scale.float().repeat_interleave(16, -1)
            assert torch.equal(codes, e2m1_encode(start / scales.float().repeat_interleave(16, -1)))
        else:
            assert torch.equal(codes, unpack_nibbles(q.packed))
        assert torch.equal(slot.weight().detach(), e2m1_decode(codes) * scales.float().repeat_interleave(16, -1)
                           * q.scale_2)  # fmt: skip


def _layer_with_slots(bf16_checkpoint, reround):
    """Layer 0 of the tiny model with every NVFP4 weight max-rounded in a scale slot, and its twin."""
    model = load_model(bf16_checkpoint("moe"), dtype=torch.float32)
    layer, cfg = model.layers[0], model.config
    original = load_model(bf16_checkpoint("moe"), dtype=torch.float32).layers[0]
    slots = {}
    for linear in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        slot, q = _slot(linear.weight, reround)
        linear.set_weight(q.dequantize())
        slots[linear.weight.data_ptr()] = slot
    experts = layer.experts
    stacked = []
    for w in (experts.gate_up, experts.down):
        parts = [quantize(w[e]) for e in range(w.shape[0])]
        codes = torch.stack([unpack_nibbles(p.packed) for p in parts])
        scale = torch.stack([p.scale.float() for p in parts])
        scale_2 = torch.stack([p.scale_2.float() for p in parts]).reshape(-1, 1, 1)
        stacked.append(
            ScaleSlot(e2m1_decode(codes), codes, scale, scale_2, [Member("e", slice(None), 0)], reround)
        )
    experts.set_weights(*(s.weight().detach() for s in stacked))
    slots[experts.gate_up.data_ptr()], slots[experts.down.data_ptr()] = stacked
    return layer, original, cfg, slots


def test_layer_error_falls_and_an_unrouted_expert_keeps_its_scales(bf16_checkpoint):
    for reround in (False, True):
        layer, original, cfg, slots = _layer_with_slots(bf16_checkpoint, reround)
        lengths = [8] * 16
        x = torch.randn(sum(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        # expert 0 gets routing weight 0 in both: like an expert no token reaches, nothing of its output counts
        unrouted = [0]
        for lay in (layer, original):
            with torch.no_grad():
                lay.router.per_expert_scale[0] = 0.0
        with torch.no_grad():
            target = original(x, CalibrationContext(cfg, lengths, chunk=0, kv_store={}, device=x.device))
        start = {k: s.scale.clone() for k, s in slots.items()}
        report = learn_block_scales(layer, slots, x, target, lengths, cfg, steps=40, lr=5e-3)
        if reround:  # re-rounding jumps codes at the smallest scale change: the start may stay the best
            assert report.loss_end <= report.loss_start, report
        else:
            assert report.loss_end < 0.9 * report.loss_start and report.moved > 0, report
        for key, slot in slots.items():
            _, scales = slot.final()
            assert torch.isfinite(scales.float()).all() and (scales.float() > 0).all()
            if slot.scale.dim() == 3:  # experts: no token, no gradient, the scales stay
                for e in unrouted:
                    assert torch.equal(scales[e].float(), start[key][e]), e


def layout(folder):
    reader = CheckpointReader(folder)
    return {name: (reader.info(name).dtype, tuple(reader.info(name).shape)) for name in reader.names()}


def test_tiny_checkpoint_block_scales_layout_and_error(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch
):
    monkeypatch.setattr(calib_block, "STEPS", 30)
    monkeypatch.setattr(calib_block, "LR", 5e-3)
    monkeypatch.setattr(calib_refine, "BLOCK_LOG", [])
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False)
    gptq = refine_checkpoint(src, base, tmp_path / "gptq", method="gptq", **args)
    tuned = refine_checkpoint(src, base, tmp_path / "block", method="gptq", block_scales=True, **args)
    assert layout(tuned) == layout(base)  # ModelOpt's names, dtypes and shapes, nothing added
    log = calib_refine.BLOCK_LOG
    assert len(log) == 6 and all(r["loss_end"] <= r["loss_start"] for r in log), log
    assert log[0]["loss_end"] < log[0]["loss_start"], log  # layer 0's output error below gptq's
    ours, theirs = CheckpointReader(tuned), CheckpointReader(gptq)
    moved = [n for n in ours.names() if n.startswith("model.layers.0.") and n.endswith("weight_scale")
             and not torch.equal(ours.get(n).float(), theirs.get(n).float())]  # fmt: skip
    assert moved
    samples = load_samples([calib_file], Tokenizer(src), num_samples=4, seq_len=seq_len)
    kl = compare_checkpoints(src, tuned, samples).agreement.kl_mean
    assert torch.isfinite(torch.tensor(kl)) and kl < compare_checkpoints(src, base, samples).agreement.kl_mean


def test_normed_loss_lowers_the_error_it_measures(bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(calib_block, "LOSS", "normed")
    layer, original, cfg, slots = _layer_with_slots(bf16_checkpoint, False)
    lengths = [8] * 16
    x = torch.randn(sum(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = original(x, CalibrationContext(cfg, lengths, chunk=0, kv_store={}, device=x.device))
    report = learn_block_scales(layer, slots, x, target, lengths, cfg, steps=40, lr=5e-3)
    assert report.loss_end < 0.99 * report.loss_start and report.moved > 0, report
    assert report.loss_start < 1.0  # relative to each token's own size
