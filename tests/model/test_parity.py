"""Our Gemma 4 decoder against transformers' reference implementation on tiny random checkpoints."""

import pytest
import torch
import transformers  # a test extra: CI fails, not skips, without it

from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model

SHAPES = ["moe", "dense", "e2b"]


def hf_model(folder, multimodal=False):
    cls = transformers.Gemma4ForConditionalGeneration if multimodal else transformers.Gemma4ForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def full_logits(model, ids):
    cache = ContiguousKVCache(model.config)
    with torch.no_grad():
        return model(ids, cache.step(len(ids)))


def prompt(n, seed=0):
    return torch.randint(5, 384, (n,), generator=torch.Generator().manual_seed(seed))


def assert_close_logits(ours, ref):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err < 1e-4 * max(scale, 1.0), f"max abs error {err} at logit scale {scale}"


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers_past_the_sliding_window(tiny_checkpoint, shape):
    folder = tiny_checkpoint(shape)
    ours = load_model(folder)
    ids = prompt(3 * ours.config.sliding_window + 5)  # several windows long
    with torch.no_grad():
        ref = hf_model(folder)(ids[None]).logits[0]
    assert_close_logits(full_logits(ours, ids), ref)


def test_multimodal_form_matches_conditional_generation(tiny_checkpoint):
    folder = tiny_checkpoint("moe", multimodal=True)
    ours = load_model(folder)
    assert ours.config.weight_prefix == "model.language_model."
    ids = prompt(20, seed=1)
    with torch.no_grad():
        ref = hf_model(folder, multimodal=True)(input_ids=ids[None]).logits[0]
    assert_close_logits(full_logits(ours, ids), ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_incremental_decoding_matches_full_forward(tiny_checkpoint, shape):
    model = load_model(tiny_checkpoint(shape))
    ids = prompt(30, seed=2)
    full = full_logits(model, ids)
    cache = ContiguousKVCache(model.config)
    steps = [ids[:7]] + [ids[i : i + 1] for i in range(7, 30)]  # a prompt chunk, then token by token
    rows = []
    with torch.no_grad():
        for chunk in steps:
            ctx = cache.step(len(chunk))
            rows.append(model(chunk, ctx))
            ctx.commit()
    assert_close_logits(torch.cat(rows), full)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_equals_transformers_generate(tiny_checkpoint, shape):
    from nvfp4kit import LLM, SamplingParams

    folder = tiny_checkpoint(shape)
    llm = LLM(folder)
    ids = prompt(12, seed=3).tolist()
    out = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    ref = (
        hf_model(folder)
        .generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, min_new_tokens=32
        )[0, len(ids) :]
        .tolist()
    )
    assert out.token_ids == ref
    assert out.finish_reason == "length"


def test_bfloat16_compute_is_as_accurate_as_transformers_bfloat16(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    ids = prompt(20, seed=4)
    with torch.no_grad():
        ref = hf_model(folder)(ids[None]).logits[0]
        hf_bf16 = transformers.Gemma4ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(
            ids[None]
        ).logits[0]
    ours_bf16 = full_logits(load_model(folder, dtype="bfloat16"), ids)
    ours_err = (ours_bf16 - ref).abs().mean()
    hf_err = (hf_bf16.float() - ref).abs().mean()
    assert ours_err <= 1.5 * hf_err, f"mean error {ours_err:.4f} vs transformers' bf16 {hf_err:.4f}"
