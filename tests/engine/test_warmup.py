"""The start-up warm-up (engine/warmup.py) and the compile counter (engine/kernel_compiles.py), CPU-visible parts:
the plan's steps stay within the engine's limits and reach every class they are meant to, the warm-up leaves the
KV pools, free lists and prefix cache as they were, and the config and CLI switches work. The GPU side (zero
compilations after the warm-up) is tests/gpu/test_warmup_cuda.py."""

from __future__ import annotations

import argparse
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from nvfp4kit.cli.engine_options import add_engine_arguments, llm_arguments
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.kernel_compiles import CompileWatch
from nvfp4kit.engine.warmup import engine_plan, warm_up, warmup_wanted
from nvfp4kit.engine.warmup_plan import StepLimits, WarmupStep, plan_steps, representatives
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams

from ..triton_variants import arg_class, record_variants, specialises
from .helpers import generate_tokens, random_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def spec_class(x: int) -> str:
    """Triton's view of a specialised integer argument: 1, divisible by 16, or other."""
    return "one" if x == 1 else "16" if x % 16 == 0 else "other"


def test_spec_class_separates_what_triton_specialises_on():
    assert [spec_class(x) for x in (1, 2, 3, 16, 17, 48)] == ["one", "other", "other", "16", "other", "16"]
    assert representatives(range(1, 40), spec_class) == [1, 2, 16]
    assert representatives(range(5, 40), lambda x: x // 10) == [5, 10, 20, 30]


def _limits(**changes) -> StepLimits:
    base = dict(max_tokens=96, max_chunk=96, max_seqs=12, max_len=600, block_size=16, eager_decode=False)
    return StepLimits(**{**base, **changes})


def _check_limits(steps: list[WarmupStep], lim: StepLimits) -> None:
    assert len(set(steps)) == len(steps)
    for s in steps:
        assert 0 < s.tokens <= lim.max_tokens
        assert len(s.decodes) + len(s.prefills) <= lim.max_seqs
        assert all(0 < n <= lim.max_chunk and start + n <= lim.max_len for start, n in s.prefills)
        assert all(0 < k <= lim.max_len for k in s.decodes)
        if not lim.eager_decode:
            assert s.prefills, "decode-only steps replay CUDA graphs: nothing to warm"


def test_plan_reaches_every_token_class_row_class_and_split_variant():
    lim = _limits()
    bucket_of = lambda t: (t > 8, t >= 64, spec_class(t))  # noqa: E731 - buckets as a config table makes them
    # two layer kinds: a sliding one (window 100) and a global one; their splits grow with keys, shrink with rows
    splits_of = lambda d, k: (min(k, 100) // 50 + 1, max(1, min(12 // d, k // 64)))  # noqa: E731
    steps = plan_steps(lim, bucket_of=bucket_of, splits_of=splits_of)
    _check_limits(steps, lim)
    assert {bucket_of(t) for t in range(1, 97)} == {bucket_of(s.tokens) for s in steps}
    rows = {len(s.decodes) + len(s.prefills) for s in steps}  # the rows whose logits a step takes
    assert {bucket_of(r) for r in range(1, 13)} == {bucket_of(r) for r in rows}
    mixed = [s for s in steps if s.decodes and s.prefills]
    reached = {splits_of(len(s.decodes), max(s.decodes)) for s in mixed}
    for kind in (0, 1):
        every = {splits_of(d, k)[kind] for d in range(1, 12) for k in range(1, 601)}
        assert every == {r[kind] for r in reached}, f"layer kind {kind}: some split variant is never run"
    assert any(start for s in steps for start, _ in s.prefills), "no chunk after a cached beginning"
    assert any(len(s.prefills) == 2 for s in steps), "no step with two prefill chunks"
    assert len(steps) < 40, "the plan should stay small: only launch classes and split variants vary"


def test_plan_splits_chunks_and_warms_eager_decodes_when_there_are_no_graphs():
    lim = _limits(max_chunk=32, eager_decode=True)
    steps = plan_steps(lim)
    _check_limits(steps, lim)
    assert any(len(s.prefills) >= 3 for s in steps), "a 96-token step is three 32-token chunks"
    assert any(s.decodes and not s.prefills for s in steps)


def test_plan_reaches_prerotated_keys_only_where_a_context_can_hold_them():
    lim = _limits(prerotate_keys=300)
    steps = plan_steps(lim)
    _check_limits(steps, lim)
    assert any(s + n == 300 for step in steps for s, n in step.prefills)
    assert not any(s + n >= 300 for step in plan_steps(_limits()) for s, n in step.prefills)
    assert steps == plan_steps(_limits(prerotate_keys=601)) + [steps[-1]]  # past max_len: nothing added


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("moe"))


def _state(engine: Engine) -> dict:
    """Everything the warm-up must leave as it was: pool tensors, free lists, prefix-cache tables."""
    cache, prefix = engine.cache, engine.scheduler.prefix
    tensors = {f"{kind}{layer}": t.clone() for kind, pool in (("k", cache.keys), ("v", cache.values))
               for layer, t in pool.items() if t is not None}  # fmt: skip
    return {
        "tensors": tensors,
        "blocks": list(cache.free_blocks.plain), "cached": list(cache.free_blocks.cached),
        "rings": list(cache.free_rings.plain), "parked": list(cache.free_rings.parked),
        "tables": (dict(prefix.digest_of), dict(prefix.block_of), dict(prefix.ring_at), dict(prefix.points_of)),
        "refs": list(prefix.refs), "hits": prefix.hit_tokens,
    }  # fmt: skip


def _assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for name, t in a["tensors"].items():
        assert torch.equal(t, b["tensors"][name]), f"pool {name} changed"
    for key in ("blocks", "cached", "rings", "parked", "tables", "refs", "hits"):
        assert a[key] == b[key], key


def test_warm_up_leaves_pools_free_lists_and_prefix_cache_as_they_were(model):
    config = EngineConfig(block_size=4, num_kv_tokens=256, max_num_seqs=4, max_num_batched_tokens=24)
    engine = Engine(model, None, config=config)
    assert engine.warmup is None, "the warm-up is off on the CPU by default"
    prompts = random_prompts([30, 13], seed=3)
    first = generate_tokens(engine, prompts, GREEDY)  # cached blocks and parked rings now exist
    assert engine.scheduler.prefix.digest_of and engine.cache.free_rings.parked
    before = _state(engine)
    steps = plan_steps(
        StepLimits(24, 24, 4, 64, 4, eager_decode=True), bucket_of=lambda t: t, splits_of=lambda d, k: k // 16
    )  # decodes, mixes, chunks after a cached beginning: the torch attention writes real K/V into the scratch
    report = warm_up(engine, steps)
    assert report.steps == len(steps) > 10 and report.max_tokens == 24
    _assert_same(before, _state(engine))
    again = generate_tokens(engine, prompts, GREEDY)  # served from the same cache, same tokens
    assert again == first and engine.scheduler.prefix.hit_tokens > before["hits"]


def test_warm_up_refuses_a_busy_engine(model):
    engine = Engine(model, None, config=EngineConfig(max_num_seqs=2, max_num_batched_tokens=16))
    engine.add_request([5, 6, 7], GREEDY)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.warm_up()


def test_triton_attention_warm_up_touches_only_its_scratch(model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = EngineConfig(block_size=4, num_kv_tokens=128, max_num_seqs=2, max_num_batched_tokens=16,
                          attention_backend="triton")  # fmt: skip
    engine = Engine(model, None, config=config)
    plan = engine_plan(engine)
    assert plan and all(s.tokens <= 16 for s in plan)
    generate_tokens(engine, random_prompts([9], seed=5), GREEDY)
    before = _state(engine)
    steps = [WarmupStep((9,), ((0, 5),)), WarmupStep((), ((8, 7),)), WarmupStep((3, 21), ((0, 2),))]
    warm_up(engine, steps)  # paged decode, prefill tiles and KV writes through the (interpreted) kernels
    _assert_same(before, _state(engine))
    # a context long enough for pre-rotated derived keys: the plan ends with it, and it writes only scratch
    from nvfp4kit.kernels import rotated_keys

    monkeypatch.setattr(rotated_keys, "PREROTATE_MIN_KEYS", 24)
    assert engine_plan(engine)[-1] == WarmupStep((), ((22, 2),))
    rotations = []
    real = rotated_keys.rotate_derived_keys
    monkeypatch.setattr(
        rotated_keys, "rotate_derived_keys", lambda *a, **kw: rotations.append(1) or real(*a, **kw)
    )
    warm_up(engine, [WarmupStep((), ((22, 2),))])
    assert rotations  # once per global layer
    _assert_same(before, _state(engine))


def test_config_switch_runs_it_on_the_cpu(model):
    assert warmup_wanted(None, torch.device("cuda")) and not warmup_wanted(None, torch.device("cpu"))
    assert warmup_wanted(True, torch.device("cpu")) and not warmup_wanted(False, torch.device("cuda"))
    config = EngineConfig(
        block_size=4, num_kv_tokens=64, max_num_seqs=2, max_num_batched_tokens=8, warmup=True
    )
    engine = Engine(model, None, config=config)
    assert engine.warmup is not None and engine.warmup.steps > 5 and engine.warmup.max_tokens == 8
    assert engine.cache.usage == {"global": 0.0, "sliding": 0.0}


def test_warm_up_runs_the_samplers_greedy_argmax_on_every_step(model, monkeypatch):
    """Serving steps sample eagerly after the forward: on a GPU `greedy_table`'s two Triton kernels, which a
    warm-up that stopped at the logits left to compile on the first request (seen on the H100, session 34)."""
    from nvfp4kit.engine import batch_sampler

    seen = []
    real = batch_sampler.greedy_table
    monkeypatch.setattr(
        batch_sampler, "greedy_table", lambda logits: seen.append(logits.shape) or real(logits)
    )
    config = EngineConfig(
        block_size=4, num_kv_tokens=64, max_num_seqs=2, max_num_batched_tokens=8, warmup=True
    )
    engine = Engine(model, None, config=config)
    assert len(seen) == engine.warmup.steps and {shape[1] for shape in seen} == {model.config.vocab_size}


def test_warmup_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert llm_arguments(parser.parse_args([]))["engine_config"].warmup is None  # on CUDA only
    assert llm_arguments(parser.parse_args(["--no-warmup"]))["engine_config"].warmup is False
    assert llm_arguments(parser.parse_args(["--warmup"]))["engine_config"].warmup is True
    assert "warm-up" in parser.format_help()


def test_compile_watch_counts_after_ready_warns_and_chains(monkeypatch, caplog):
    triton = pytest.importorskip("triton")
    calls = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda **kw: calls.append(kw["repr"]))
    watch = CompileWatch()
    assert watch.install() and watch.install()
    hook = triton.knobs.runtime.jit_post_compile_hook
    fn = SimpleNamespace(module="nvfp4kit.kernels.norms", name="_rms_norm_kernel")
    hook(key="k", repr="_rms_norm_kernel[num_warps=4](i32)", fn=fn, compile={}, is_manual_warmup=False,
         already_compiled=False)  # fmt: skip
    assert watch.counts() == (1, 0) and not caplog.records
    watch.mark_ready()
    with caplog.at_level(logging.WARNING, logger="nvfp4kit.engine.kernel_compiles"):
        hook(key="k2", repr="_rms_norm_kernel[num_warps=4](i32:16)", fn=fn, compile={}, is_manual_warmup=False,
             already_compiled=False)  # fmt: skip
    assert watch.counts() == (2, 1)
    assert watch.serving_kernels == ["nvfp4kit.kernels.norms._rms_norm_kernel"]
    assert "_rms_norm_kernel" in caplog.text and "i32:16" in caplog.text
    assert len(calls) == 2, "the hook set before ours still runs"


def test_metrics_export_the_compile_counters():
    from nvfp4kit.serve.engine_protocol import EngineStats
    from nvfp4kit.serve.metrics import ServerMetrics

    text = ServerMetrics(lambda: EngineStats(0, 0)).render()
    assert "\nnvfp4kit_kernel_compiles_total " in text
    assert "\nnvfp4kit_kernel_compiles_after_warmup_total " in text


def test_the_emulation_follows_do_not_specialize(monkeypatch):
    """The per-step counts of the attention kernels are unspecialised (no variant per step shape); the kernel
    still tells 1 from 16 from other for an argument that is not listed."""
    from triton.runtime.interpreter import InterpretedFunction

    from nvfp4kit.kernels import paged_attention

    kernel = paged_attention._paged_attention_kernel
    if not isinstance(kernel, InterpretedFunction):
        pytest.skip("the kernels are compiled here (no TRITON_INTERPRET)")
    assert not specialises(kernel, "num_rows") and not specialises(kernel, "stride_bt")
    assert specialises(kernel, "stride_qt") and not specialises(kernel, "no_such_argument")
    assert arg_class(17, False) == arg_class(32, False) == arg_class(1, False)
    assert len({arg_class(x, True) for x in (1, 17, 32)}) == 3
    t = torch.zeros(8, dtype=torch.int32)
    assert arg_class(t[1:], False) == arg_class(t, False) != arg_class(t[1:], True)


def test_random_traffic_meets_no_variant_the_warm_up_missed(monkeypatch):
    """The whole Triton path of a tiny NVFP4 MoE with FP8 KV (no CUDA graphs: decode-only steps are eager too),
    key splits chosen as on a 132-SM card; after the warm-up, 100 random requests (1 to 900 tokens, shared
    beginnings, arrivals between steps) launch no kernel variant the warm-up did not."""
    from triton.runtime.interpreter import InterpretedFunction

    from nvfp4kit.config import config_from_dict
    from nvfp4kit.kernels import attention_launch, paged_attention
    from nvfp4kit.kernels.backend import TritonBackend
    from nvfp4kit.testing.random_model import random_model
    from nvfp4kit.testing.tiny_config import tiny_text_config

    if not isinstance(paged_attention._paged_attention_kernel, InterpretedFunction):
        pytest.skip(
            "the kernels are compiled here (no TRITON_INTERPRET): tests/gpu/test_warmup_cuda.py counts"
        )
    keys = record_variants(monkeypatch)
    h200 = lambda items, kv_heads, max_keys, *, device, **shape: max(
        1, min(528 // (items * kv_heads), max_keys // 128, 128)
    )  # noqa: E731
    monkeypatch.setattr(attention_launch, "choose_num_splits", h200)
    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, dtype=torch.bfloat16, device="cpu", backend=TritonBackend())
    config = EngineConfig(kv_dtype="fp8_e4m3", max_num_seqs=10, max_num_batched_tokens=64, max_model_len=1024,
                          num_kv_tokens=16 * 1024, attention_backend="triton", warmup=True)  # fmt: skip
    engine = Engine(model, None, config=config)
    warm = set(keys)
    assert 10 < engine.warmup.steps < 60 and len(warm) > 30
    rng = random.Random(0)
    shared = [rng.randrange(5, 380) for _ in range(500)]
    pending = []
    for _ in range(100):
        own = [rng.randrange(5, 380) for _ in range(rng.choice([rng.randint(1, 30), rng.randint(30, 900)]))]
        prompt = (shared[: rng.randint(1, 500)] + own if rng.random() < 0.3 else own)[:900]
        pending.append(
            (prompt, SamplingParams(max_tokens=rng.randint(1, 100), temperature=0, ignore_eos=True))
        )
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 5])):
            if pending:
                engine.add_request(*pending.pop())
        engine.step()
    missed = keys - warm
    assert not missed, f"{len(missed)} variants after the warm-up, e.g. {sorted(missed, key=str)[:2]}"
