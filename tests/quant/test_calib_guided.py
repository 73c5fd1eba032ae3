"""Loss-aware token weights (calib_guided): gradients of the loss at each linear's output weight X^T X."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.cli import main
from nvfp4kit.eval import compare_checkpoints, load_samples
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.quant import calib_gptq, calib_guided, quantize
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_gptq import gptq_quantize, gptq_quantize_group
from nvfp4kit.quant.calib_guided import token_sensitivities
from nvfp4kit.quant.calib_hessian import HessianBackend
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.tokenizer import Tokenizer


def test_guided_weights_replace_norm_aware_ones_on_the_chunk_window():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(8, 16, generator=gen), torch.randn(10, 16, generator=gen)
    guide = torch.rand(30, generator=gen)
    backend = HessianBackend(norm_aware=True)
    backend.guide = {"lin": guide}
    backend.window = slice(20, 30)
    backend.watch_normed(weight, "lin", group=8)
    backend.linear(x, weight)
    assert torch.allclose(backend.hessians["lin"], (x * guide[20:30, None]).T @ x)
    backend.guide = {}  # without a guide: the norm-aware weights, which differ
    backend.clear()
    backend.watch_normed(weight, "lin", group=8)
    backend.linear(x, weight)
    assert not torch.allclose(backend.hessians["lin"], (x * guide[20:30, None]).T @ x)


def test_row_groups_are_each_swept_with_their_own_statistics():
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)]  # a fused pair, 16 rows
    x = torch.randn(4, 200, 32, generator=gen)
    hessians = torch.stack([(x[g] * (1 + g)).T @ x[g] for g in range(4)])  # 4 groups of 4 rows
    grouped = gptq_quantize_group(w, hessians)
    fused = torch.cat(w)
    scale_2 = grouped[0].scale_2
    for g in range(4):  # the rows of group g: GPTQ with H_g and the shared tensor scale
        alone = gptq_quantize(fused[4 * g : 4 * g + 4], hessians[g], scale_2=scale_2)
        member, rows = divmod(4 * g, 8)
        assert torch.equal(grouped[member].packed[rows : rows + 4], alone.packed)
        assert torch.equal(grouped[member].scale[rows : rows + 4].float(), alone.scale.float())
    same = gptq_quantize_group(w, hessians[:1].expand(4, -1, -1).clone())  # equal groups: the plain solve
    plain = gptq_quantize_group(w, hessians[0])
    for a, b in zip(same, plain):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale.float(), b.scale.float())
        assert torch.equal(a.scale_2, b.scale_2)


def test_last_layer_outputs_at_a_windows_last_token_do_not_touch_the_loss(bf16_checkpoint, calib_file):
    """Causal attention: the last layer's output at a window's last position reaches only that position's
    logits, which predict nothing, so its weight is exactly zero; every other token's is positive."""
    src = bf16_checkpoint("moe")
    samples = calibration_samples(Tokenizer(src), [calib_file], num_samples=3, seq_len=40)
    weights = token_sensitivities(src, samples, labels="data", chunk_tokens=80)  # two chunks
    cfg = load_model(src).config
    last = cfg.num_hidden_layers - 1
    assert f"layers.{last}.experts" in weights and "layers.0.self_attn.q_proj" in weights
    ends = torch.tensor([len(s) for s in samples]).cumsum(0) - 1
    for name in (f"layers.{last}.mlp.down_proj", f"layers.{last}.self_attn.o_proj"):
        w = weights[name]
        assert w.shape == (sum(len(s) for s in samples),)
        assert torch.all(w[ends] == 0), name
        others = torch.ones_like(w, dtype=torch.bool)
        others[ends] = False
        assert torch.all(w[others] > 0), name
    sampled = token_sensitivities(src, samples, labels="sampled", chunk_tokens=80)
    assert not torch.equal(sampled[f"layers.{last}.mlp.down_proj"], weights[f"layers.{last}.mlp.down_proj"])
    grouped = token_sensitivities(src, samples, labels="data", group_rows=16)
    assert grouped[f"layers.{last}.mlp.down_proj"].shape == (sum(map(len, samples)), cfg.hidden_size // 16)
    assert torch.all(grouped[f"layers.{last}.mlp.down_proj"][ends] == 0)
    assert grouped[f"layers.{last}.experts"].dim() == 1  # experts: per token
    with pytest.raises(ValueError, match="labels"):
        token_sensitivities(src, samples, labels="kl")


@pytest.mark.parametrize("group_rows", [0, 16])
def test_tiny_checkpoint_loss_weighted_gptq_keeps_the_export_format(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path, monkeypatch, group_rows
):
    monkeypatch.setattr(calib_guided, "GROUP_ROWS", group_rows)
    solves = []
    row_groups = calib_gptq._gptq_row_groups
    monkeypatch.setattr(
        calib_gptq, "_gptq_row_groups", lambda *a, **k: solves.append(1) or row_groups(*a, **k)
    )
    num_samples, seq_len = calib_shape
    src, base = bf16_checkpoint("moe"), quantized("moe")
    args = dict(
        method="gptq", calib_data=[calib_file], num_samples=num_samples, seq_len=seq_len, progress=False
    )
    plain = CheckpointReader(refine_checkpoint(src, base, tmp_path / "plain", **args))
    guided = CheckpointReader(refine_checkpoint(src, base, tmp_path / "guided", loss_weights="data", **args))
    export = CheckpointReader(base)
    assert guided.names() == export.names()
    for name in export.names():
        a, b = export.get(name), guided.get(name)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    scales = [n for n in guided.names() if n.endswith(".weight_scale")]
    assert (
        sum(not torch.equal(plain.get(n).float(), guided.get(n).float()) for n in scales) > len(scales) // 2
    )
    load_model(tmp_path / "guided")
    assert bool(solves) == bool(group_rows)  # grouped statistics reached GPTQ's row-group solve


def test_cli_gptq_guided_writes_the_max_layout_with_less_output_error(
    bf16_checkpoint, quantized, calib_file, calib_shape, tmp_path
):
    """`--calibration gptq-guided`: ModelOpt's tensors (the max export's names, shapes and dtypes), loads, and
    its layer-0 q/k/v (inputs the same in every stream) have less output error on the calibration
    activations than max's."""
    num_samples, seq_len = calib_shape
    src, out = bf16_checkpoint("moe"), tmp_path / "guided"
    args = ["quantize", str(src), str(out), "--calibration", "gptq-guided", "--calib-data", str(calib_file)]
    args += ["--num-samples", str(num_samples), "--seq-len", str(seq_len), "--calib-dtype", "float32"]
    assert main([*args, "--no-progress"]) == 0
    reference = quantized("moe")
    ours, theirs = CheckpointReader(out), CheckpointReader(reference)
    assert ours.names() == theirs.names()
    for name in theirs.names():
        assert (ours.info(name).dtype, ours.info(name).shape) == (
            theirs.info(name).dtype,
            theirs.info(name).shape,
        )
    model = load_model(out, dtype=torch.float32)
    assert model.config.num_hidden_layers > 1
    bf16 = load_model(src, dtype=torch.float32)
    backend = HessianBackend()
    bf16.set_backend(backend)
    backend.watch_normed(
        bf16.layers[0].self_attn.qkv_proj.weight, "qkv", group=bf16.layers[0].self_attn.head_dim
    )
    with torch.no_grad():
        for window in calibration_samples(
            Tokenizer(src), [calib_file], num_samples=num_samples, seq_len=seq_len
        ):
            ids = torch.tensor(window)
            bf16(ids, ContiguousKVCache(bf16.config).step(len(ids)))
    h = backend.hessians["qkv"]
    prefix = "model.layers.0.self_attn."
    names = [p for p in ("q_proj", "k_proj", "v_proj") if f"{prefix}{p}.weight" in CheckpointReader(src)]
    weight = torch.cat([CheckpointReader(src).get(f"{prefix}{p}.weight").float() for p in names])

    def output_error(reader: CheckpointReader) -> float:
        deq = torch.cat(
            [NVFP4Tensor(*(reader.get(f"{prefix}{p}.{t}") for t in ("weight", "weight_scale", "weight_scale_2")))
             .dequantize() for p in names]
        )  # fmt: skip
        diff = weight - deq
        return float(torch.einsum("ni,ij,nj->", diff, h, diff))

    assert output_error(ours) < 0.9 * output_error(theirs), (output_error(ours), output_error(theirs))


def test_e2b_per_layer_inputs_and_shared_kv(bf16_checkpoint, calib_file, tmp_path):
    """The gradient pass through per-layer inputs and layers that reuse earlier keys/values (E2B-like)."""
    src = bf16_checkpoint("e2b", hidden_size_per_layer_input=16)
    kwargs = dict(
        calib_data=[calib_file], num_samples=6, seq_len=48, progress=False, calib_dtype=torch.float32
    )
    base = quantize(src, tmp_path / "max", **kwargs).output
    guided = quantize(src, tmp_path / "guided", calibration="gptq-guided", **kwargs).output
    assert CheckpointReader(guided).names() == CheckpointReader(base).names()
    samples = load_samples([calib_file], Tokenizer(src), num_samples=4, seq_len=48)
    kl = {f: compare_checkpoints(src, f, samples).agreement.kl_mean for f in (base, guided)}
    assert kl[guided] < 0.95 * kl[base], kl


def test_a_model_too_large_for_the_gradient_pass_is_refused_before_any_work(
    bf16_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr(calib_guided, "free_memory", lambda device: 2**20)  # 1 MiB free
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"gptq-guided.*fp32.*--calibration gptq"):
        quantize(
            bf16_checkpoint("moe"), out, calibration="gptq-guided", num_samples=2, seq_len=16, progress=False
        )
    assert not out.exists() and not list(tmp_path.glob(".out.max-*"))  # refused before the max pass
