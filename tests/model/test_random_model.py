"""Random in-memory models (for benchmarks of the real shapes without a download)."""

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.testing.random_model import random_model, random_nvfp4
from nvfp4kit.testing.tiny import tiny_text_config


def test_random_nvfp4_entries_have_the_scale_of_a_trained_layer():
    w = random_nvfp4(out_features=64, in_features=2816, device=torch.device("cpu")).dequantize()
    assert w.std().item() == pytest.approx(2816**-0.5, rel=0.3)


@pytest.mark.parametrize("quantized", [True, False])
def test_random_model_runs_and_is_quantized_as_asked(quantized):
    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=quantized, dtype=torch.float32, device="cpu")
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.quantized == quantized
    assert not model.layers[0].router.proj.quantized  # routers stay BF16, as in the seed's recipe
    gate_up = model.layers[0].experts.gate_up_packed if quantized else model.layers[0].experts.gate_up
    assert gate_up.shape[0] == cfg.num_experts
    with torch.no_grad():
        logits = model(torch.arange(2, 12), ContiguousKVCache(cfg).step(10))
    assert torch.isfinite(logits).all() and logits.std() > 0.01


def test_kept_dense_weights_give_the_same_logits_and_follow_replaced_weights():
    """CPU inference keeps expanded copies of the NVFP4 weights (`keep_dense_weights`): the logits must be the
    per-call expansion's bit for bit; a weight stored again later is expanded per call, not served stale."""
    from nvfp4kit.model.layers import keep_dense_weights, stored_weight

    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, dtype=torch.float32, device="cpu")
    ids = torch.arange(2, 14)

    def run():
        with torch.no_grad():
            return model(ids, ContiguousKVCache(cfg).step(len(ids)))

    expanded_per_call = run()
    assert (
        keep_dense_weights(model, torch.float32, limit_bytes=1) == 0
    )  # too big for the budget: nothing kept
    kept = keep_dense_weights(model, torch.float32, limit_bytes=2**30)
    qkv = model.layers[0].self_attn.qkv_proj
    assert kept > 0 and "_dense" in stored_weight(qkv, "weight").__dict__
    assert torch.equal(run(), expanded_per_call)
    fresh = random_model(cfg, quantized=True, dtype=torch.float32, device="cpu", seed=1)
    qkv.set_weight(stored_weight(fresh.layers[0].self_attn.qkv_proj, "weight"))
    assert "_dense" not in stored_weight(qkv, "weight").__dict__
    assert not torch.equal(run(), expanded_per_call)


def test_linear_copies_leave_the_experts_packed():
    """`--linear-copies` keeps BF16 copies of the attention and dense-MLP weights only: the experts (most of the
    bytes) stay NVFP4, and the bytes returned are the copies' (2 bytes a weight)."""
    from nvfp4kit.model.layers import Linear, keep_dense_weights, stored_weight

    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, dtype=torch.bfloat16, device="cpu")
    kept = keep_dense_weights(model, torch.bfloat16, limit_bytes=2**30, linears_only=True)
    layer = model.layers[0]
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.quantized]
    assert layer.self_attn.qkv_proj in linears and layer.self_attn.o_proj in linears
    assert all("_dense" in stored_weight(m, "weight").__dict__ for m in linears)
    assert kept == sum(2 * m.out_features * m.in_features for m in linears)
    experts = layer.experts
    assert "_dense" not in stored_weight(experts, "gate_up").__dict__
    assert "_dense" not in stored_weight(experts, "down").__dict__
