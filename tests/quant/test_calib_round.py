"""Learned rounding (calib_round, `--calibration gptq-round`): starts exactly at GPTQ's codes, moves a code at
most one grid step, writes max's layout, and lowers the tiny model's output error below max calibration's."""

from __future__ import annotations

import torch

from nvfp4kit.cli import main
from nvfp4kit.eval import compare_checkpoints, load_samples
from nvfp4kit.formats.nvfp4 import e2m1_decode, quantize, unpack_nibbles
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_round
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.quant.calib_round import Member, layer_norms, learn_rounding, make_slot
from nvfp4kit.quant.calibrate import CalibrationContext
from nvfp4kit.tokenizer import Tokenizer


def layout(folder):
    reader = CheckpointReader(folder)
    return {name: (reader.info(name).dtype, tuple(reader.info(name).shape)) for name in reader.names()}


def test_slot_starts_at_the_given_codes_and_moves_one_grid_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    q = quantize(w)
    codes = unpack_nibbles(q.packed)
    slot = make_slot(codes, q.scale, q.scale_2, w, [Member("x", slice(0, 8))])
    assert torch.equal(slot.weight().detach(), q.dequantize())  # offsets 0: exactly the given codes
    assert torch.equal(slot.final_codes(), codes)
    assert slot.start.abs().max() <= 0.45 and (slot.start != 0).float().mean() > 0.9
    # gradients reach the offsets straight through the rounding
    (slot.weight() * torch.randn(8, 64, generator=gen)).sum().backward()
    assert slot.offset.grad is not None and slot.offset.grad.abs().sum() > 0
    with torch.no_grad():
        slot.offset.copy_(0.5 * torch.sign(slot.start))  # push every code towards its original weight
    before, after = e2m1_decode(codes), e2m1_decode(slot.final_codes())
    moved = before != after
    assert moved.float().mean() > 0.5
    grid = sorted({abs(v) for v in e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist()})
    signed = torch.tensor(sorted({-g for g in grid} | set(grid)))
    rank = lambda v: torch.searchsorted(signed, v.contiguous())  # noqa: E731
    assert ((rank(after) - rank(before)).abs() <= 1).all()  # one grid step at most
    x0 = w / (slot.scale.repeat_interleave(16, -1) * slot.scale_2)
    assert (torch.sign(after - before)[moved] == torch.sign(x0 - before)[moved]).all()  # towards the weight
    assert torch.equal(slot.weight().detach(), after * q.scale.float().repeat_interleave(16, -1) * q.scale_2)


def test_tiny_checkpoint_gptq_round_layout_and_error(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch
):
    monkeypatch.setattr(calib_round, "STEPS", 40)  # the tiny model needs few; keeps the test short
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False)
    gptq = refine_checkpoint(src, base, tmp_path / "gptq", method="gptq", **args)
    rounded = tmp_path / "round"  # through the command line, as users reach it
    cli = ["quantize", str(src), str(rounded), "--calibration", "gptq-round", "--calib-data", str(calib_file)]
    cli += ["--num-samples", str(num_samples), "--seq-len", str(seq_len), "--calib-dtype", "float32"]
    assert main([*cli, "--no-progress"]) == 0
    assert layout(rounded) == layout(base)  # ModelOpt's names, dtypes and shapes, nothing added
    ours, theirs = CheckpointReader(rounded), CheckpointReader(gptq)
    packed = [n for n in ours.names() if n.endswith(".weight") and ours.get(n).dtype == torch.uint8]
    assert len(packed) > 100
    layer0 = [n for n in packed if n.startswith("model.layers.0.")]
    assert sum(not torch.equal(ours.get(n), theirs.get(n)) for n in layer0) > len(layer0) // 2
    for name in ours.names():  # codes and norms move: layer 0's block and tensor scales stay GPTQ's (the
        # later layers' GPTQ already sees the rounded layers before them)
        if name.startswith("model.layers.0.") and name.endswith(("weight_scale", "weight_scale_2")):
            assert torch.equal(ours.get(name).float(), theirs.get(name).float()), name
    norms = [n for n in ours.names() if n.startswith("model.layers.0.") and n.endswith("norm.weight")]
    assert norms and sum(not torch.equal(ours.get(n), theirs.get(n)) for n in norms) > len(norms) // 2
    model = load_model(rounded, dtype=torch.float32)
    ids = torch.arange(40, 90)
    with torch.no_grad():
        assert torch.isfinite(model(ids, ContiguousKVCache(model.config).step(len(ids)))).all()
    samples = load_samples([calib_file], Tokenizer(src), num_samples=4, seq_len=seq_len)
    kl = {name: compare_checkpoints(src, folder, samples).agreement.kl_mean
          for name, folder in (("max", base), ("round", rounded))}  # fmt: skip
    assert kl["round"] < 0.9 * kl["max"], kl


def _quantized_layer(bf16_checkpoint):
    """Layer 0 of the tiny model with its dense linears NVFP4-rounded (max), a slot each, and 16 windows."""
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
        w = linear.weight
        q = quantize(w)
        linear.set_weight(q.dequantize())
        slots[linear.weight.data_ptr()] = make_slot(unpack_nibbles(q.packed), q.scale, q.scale_2, w, [])
    lengths = [8] * 16
    x = torch.randn(sum(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    return layer, original, cfg, slots, lengths, x


def _outputs(layer, cfg, lengths, x):
    with torch.no_grad():
        return layer(x, CalibrationContext(cfg, lengths, chunk=0, kv_store={}, device=x.device))


def test_kept_aside_windows_keep_the_start_when_nothing_helps(bf16_checkpoint):
    layer, _, cfg, slots, lengths, x = _quantized_layer(bf16_checkpoint)
    norms = layer_norms(layer)
    before = {name: w.clone() for name, w in norms.items()}
    target = _outputs(layer, cfg, lengths, x)  # the quantized layer itself: every move makes it worse
    report = learn_rounding(layer, slots, x, target, lengths, cfg, norms=norms, steps=8)
    assert report.flipped == 0 and report.loss_end == report.loss_start
    assert all(torch.equal(norms[n], before[n]) for n in norms)


def test_learned_rounding_lowers_the_kept_aside_error(bf16_checkpoint):
    layer, original, cfg, slots, lengths, x = _quantized_layer(bf16_checkpoint)
    target = _outputs(original, cfg, lengths, x)  # the unquantized layer
    norms = layer_norms(layer)
    report = learn_rounding(layer, slots, x, target, lengths, cfg, norms=norms, steps=40)
    assert report.loss_end < 0.95 * report.loss_start and report.flipped > 0, report
    for w in norms.values():  # written as the checkpoint stores norms
        assert torch.equal(w, w.to(torch.bfloat16).float())
