"""Start-up sizing: the KV budget from the planner, the memory options, and the fits-check before loading."""

import json
import logging

import pytest
import torch

from nvfp4kit.config import PRESET_DIR, load_preset
from nvfp4kit.engine.engine import EngineConfig, resolve_kv_dtype, with_device_defaults
from nvfp4kit.engine.sizing import (
    CONTEXT_ALLOWANCE,
    DeviceMemory,
    InsufficientMemoryError,
    MemoryOptions,
    plan_engine_memory,
    weights_as_loaded,
)
from nvfp4kit.plan.checkpoint import weights_from_checkpoint
from nvfp4kit.plan.pools import activation_bytes_per_token, default_prefill_chunk, plan_pools
from nvfp4kit.plan.report import build_plan, pool_summary
from nvfp4kit.plan.units import GiB, MiB, parse_size
from nvfp4kit.plan.vision import vision_memory
from nvfp4kit.plan.weights import weights_from_config

CFG = load_preset("gemma-4-26b-a4b")
WEIGHTS = weights_from_config(CFG, recipe="all-nvfp4").text_bytes  # 14.22 GiB
H100 = DeviceMemory(total_bytes=int(79.19 * GiB), free_bytes=int(78.6 * GiB), name="H100")
FP8 = EngineConfig(kv_dtype="fp8_e5m2", max_num_batched_tokens=512)


def size(options=None, *, memory=H100, config=FP8, weights=WEIGHTS, cfg=CFG, vision=None):
    return plan_engine_memory(
        cfg, weights_bytes=weights, memory=memory, options=options or MemoryOptions(), config=config,
        kv_dtype="fp8_e5m2", vision=vision,
    )  # fmt: skip


def test_a_24gib_budget_holds_over_400k_global_fp8_tokens_as_the_planner_says():
    plan = size(MemoryOptions.parse(gpu_memory_budget="24GiB"))
    own = H100.in_use_bytes  # 0.59 GiB in use at start: our CUDA context, counted inside the budget
    direct = plan_pools(CFG, free_bytes=24 * GiB - own, weights_bytes=WEIGHTS, kv_dtype="fp8_e5m2",
                        k_eq_v_once=True, prefill_chunk=512, context=CFG.max_position_embeddings,
                        concurrency=16, max_batch=16)  # fmt: skip
    assert plan.kv_cache_memory == direct.kv_budget_bytes
    assert plan.pool.global_tokens == direct.global_tokens >= 400_000
    assert plan.pool.max_context == CFG.max_position_embeddings
    assert WEIGHTS + plan.pool.reserve.total + plan.kv_cache_memory == 24 * GiB - own


def test_the_engine_plan_is_the_plan_commands_at_the_same_settings():
    """`nvfp4kit plan --gpu-memory 32GiB --concurrency 64` and an engine of 64 sequences on that card agree
    (the plan reserves logits and graph memory for a batch of 64 at least, so they agree from 64 up)."""
    card = DeviceMemory(total_bytes=32 * GiB, free_bytes=32 * GiB - CONTEXT_ALLOWANCE)  # as the plan assumes
    # the plan command defaults to the tokens a step serve takes on a card of this size
    engine = EngineConfig(
        kv_dtype="fp8_e5m2", max_num_seqs=64, max_num_batched_tokens=default_prefill_chunk(32 * GiB)
    )
    for vision in (False, True):  # text only (--no-vision / --language-model-only), and images on
        shown = build_plan("gemma-4-26b-a4b", gpu_memory=32 * GiB, kv_dtype="fp8_e5m2", concurrency=64,
                           context=CFG.max_position_embeddings, vision=vision)["nvfp4kit"]  # fmt: skip
        raw = json.loads((PRESET_DIR / "gemma-4-26b-a4b.json").read_text())["config"]
        tower = vision_memory(raw) if vision else None
        plan = size(MemoryOptions(gpu_memory_utilization=1.0), memory=card, config=engine, vision=tower)
        assert pool_summary(plan.pool) == shown
        assert (shown["vision"] is not None) == vision


def test_the_start_up_log_prints_the_plan_rows():
    text = size(MemoryOptions.parse(gpu_memory_budget="24GiB")).format()
    for row in ("weights, GiB", "14.22", "runtime reserve, GiB", "graphs", "KV budget, GiB", "global-layer KV tokens",
                "1,536 ring per request", "262,144 (model limit)", "--gpu-memory-budget 24.00 GiB", "16 sequences"):  # fmt: skip
        assert row in text


def test_too_small_a_budget_raises_with_the_numbers_before_loading():
    with pytest.raises(InsufficientMemoryError) as err:
        size(MemoryOptions.parse(gpu_memory_budget="15.5GiB"))
    message = str(err.value)
    for part in ("weights 14.22 GiB", "runtime reserve", "minimum KV", "262,144-token request",
                 "--gpu-memory-budget 15.50 GiB", "--max-model-len", "--max-num-seqs"):  # fmt: skip
        assert part in message
    # what the message suggests works: one sequence at 4K fits the same budget
    small = EngineConfig(kv_dtype="fp8_e5m2", max_num_seqs=1, max_model_len=4096, max_num_batched_tokens=512)
    assert size(MemoryOptions.parse(gpu_memory_budget="15.5GiB"), config=small).pool.max_context == 4096


def test_utilization_is_a_fraction_of_the_total_and_the_budget_replaces_it():
    own = H100.in_use_bytes
    default = size()
    assert default.limit_bytes == int(0.90 * H100.total_bytes)
    assert default.usable_bytes == int(0.90 * H100.total_bytes) - own
    half = size(MemoryOptions(gpu_memory_utilization=0.5))
    assert half.usable_bytes == int(0.5 * H100.total_bytes) - own
    assert half.kv_cache_memory < default.kv_cache_memory
    assert size(MemoryOptions.parse(gpu_memory_budget="30GiB")).usable_bytes == 30 * GiB - own
    with pytest.raises(ValueError, match="not both"):
        MemoryOptions.parse(gpu_memory_utilization=0.5, gpu_memory_budget="30GiB")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        MemoryOptions(gpu_memory_utilization=1.5)


def test_kv_cache_memory_overrides_both_for_the_kv_and_is_checked_against_what_is_free():
    for options in (MemoryOptions.parse(kv_cache_memory="8GiB"),
                    MemoryOptions.parse(kv_cache_memory="8GiB", gpu_memory_budget="24GiB"),
                    MemoryOptions(gpu_memory_utilization=0.3, kv_cache_memory=8 * GiB)):  # fmt: skip
        assert size(options).kv_cache_memory == 8 * GiB
    # without a budget only the free memory bounds it (utilization no longer sizes anything) ...
    assert (
        size(MemoryOptions(gpu_memory_utilization=0.3, kv_cache_memory=40 * GiB)).kv_cache_memory == 40 * GiB
    )
    with pytest.raises(InsufficientMemoryError, match="78.60 GiB free"):
        size(MemoryOptions.parse(kv_cache_memory="70GiB"))
    # ... with a budget, the budget does
    with pytest.raises(InsufficientMemoryError, match="--gpu-memory-budget 24.00 GiB"):
        size(MemoryOptions.parse(kv_cache_memory="12GiB", gpu_memory_budget="24GiB"))
    with pytest.raises(InsufficientMemoryError, match="sliding rings"):
        size(MemoryOptions.parse(kv_cache_memory="1GiB"))  # 16 rings alone take 2.3 GiB


def test_memory_other_processes_hold_is_never_planned():
    shared = DeviceMemory(total_bytes=80 * GiB, free_bytes=30 * GiB)  # 50 GiB held by others
    plan = size(memory=shared)  # 0.90 x 80 GiB would be 72 GiB
    assert plan.usable_bytes == 30 * GiB
    assert WEIGHTS + plan.pool.reserve.total + plan.kv_cache_memory == 30 * GiB
    assert "other processes" in plan.format()
    # a budget on a shared card is the budget (beyond our own CUDA context), not the budget minus the others
    budget = size(MemoryOptions.parse(gpu_memory_budget="24GiB"), memory=shared)
    assert budget.usable_bytes == 24 * GiB - CONTEXT_ALLOWANCE


def test_enforce_eager_drops_the_graph_reserve_and_gives_it_to_kv():
    graphs = size(MemoryOptions.parse(gpu_memory_budget="24GiB"))
    eager = size(
        MemoryOptions.parse(gpu_memory_budget="24GiB"),
        config=EngineConfig(kv_dtype="fp8_e5m2", cuda_graphs=False, max_num_batched_tokens=512),
    )
    assert graphs.pool.reserve.cuda_graphs > 0 and eager.pool.reserve.cuda_graphs == 0
    assert eager.kv_cache_memory - graphs.kv_cache_memory == graphs.pool.reserve.cuda_graphs


def test_prefill_graphs_reserve_their_pool_and_take_it_from_kv():
    budget = MemoryOptions.parse(gpu_memory_budget="24GiB")
    plain = size(budget, config=EngineConfig(kv_dtype="fp8_e5m2", max_num_batched_tokens=2048))
    graphs = size(
        budget,
        config=EngineConfig(kv_dtype="fp8_e5m2", max_num_batched_tokens=2048, prefill_graphs=(512, 1024)),
    )
    grown = graphs.pool.reserve.cuda_graphs - plain.pool.reserve.cuda_graphs
    assert grown > 1024 * activation_bytes_per_token(CFG)  # the largest graph's activations, and its logits
    assert plain.kv_cache_memory - graphs.kv_cache_memory == grown
    # a count past the step budget is never captured, so it reserves nothing
    beyond = size(
        budget, config=EngineConfig(kv_dtype="fp8_e5m2", max_num_batched_tokens=2048, prefill_graphs=(4096,))
    )
    assert beyond.pool.reserve.cuda_graphs == plain.pool.reserve.cuda_graphs


def test_on_the_cpu_only_an_explicit_kv_size_is_planned():
    assert size(memory=None) is None
    plan = size(MemoryOptions.parse(kv_cache_memory="4GiB"), memory=None)
    assert plan.kv_cache_memory == 4 * GiB and plan.limit_bytes is None and not plan.cuda_graphs
    tokens = size(
        memory=None,
        config=EngineConfig(kv_dtype="fp8_e5m2", num_kv_tokens=300_000, max_num_batched_tokens=512),
    )
    assert tokens.pool.global_tokens == 300_000


@pytest.mark.parametrize(("text", "value"), [("24GiB", 24 * GiB), ("24GB", 24 * 10**9), ("24G", 24 * GiB),
                                             ("22.5GB", 22_500_000_000), ("1.5e9", 1_500_000_000), (4096, 4096)])  # fmt: skip
def test_sizes_read_as_users_write_them(text, value):
    assert parse_size(text, option="--gpu-memory-budget") == value


@pytest.mark.parametrize("junk", ["lots", "24 parsecs", "1e", "", "-3GB", "0", True])
def test_junk_sizes_are_refused_naming_the_option(junk):
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        parse_size(junk, option="--kv-cache-memory")


def test_tokens_a_step_and_sliding_passes_follow_the_card():
    """vLLM-like defaults by card: 8192 tokens a step and sliding passes of 2048 on 70+ GiB (a budget counts as
    the card's size), 2048 and 512 below, 512 and 512 on the CPU; what the user sets stays."""
    big = with_device_defaults(EngineConfig(), "cuda", gpu_memory_budget=80 * GiB)
    assert (big.max_num_batched_tokens, big.sliding_chunk) == (8192, 2048)
    small = with_device_defaults(EngineConfig(), "cuda", gpu_memory_budget=24 * GiB)
    assert (small.max_num_batched_tokens, small.sliding_chunk) == (2048, 512)
    cpu = with_device_defaults(EngineConfig(), "cpu")
    assert (cpu.max_num_batched_tokens, cpu.sliding_chunk) == (512, 512)
    mine = with_device_defaults(EngineConfig(sliding_chunk=256), "cuda", gpu_memory_budget=80 * GiB)
    assert (mine.max_num_batched_tokens, mine.sliding_chunk) == (8192, 256)


def test_prefill_graphs_by_card_and_never_with_tensor_parallelism():
    """Captured prefill steps of 256, 512, ..., 2048 tokens on 70+ GiB cards (a budget counts as the card's size), none
    on smaller ones or the CPU; what the user sets stays; tensor parallel ranks do not replay them."""
    from nvfp4kit.llm import _engine_options

    big = with_device_defaults(EngineConfig(), "cuda", gpu_memory_budget=80 * GiB).prefill_graphs
    assert big == (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert with_device_defaults(EngineConfig(), "cuda", gpu_memory_budget=24 * GiB).prefill_graphs == ()
    assert with_device_defaults(EngineConfig(), "cpu").prefill_graphs == ()
    off = EngineConfig(prefill_graphs=())
    assert with_device_defaults(off, "cuda", gpu_memory_budget=80 * GiB).prefill_graphs == ()
    flags = dict(enforce_eager=None, max_num_seqs=None, max_num_batched_tokens=None, kv_cache_dtype=None)
    assert _engine_options(EngineConfig(), tensor_parallel_size=2, **flags).prefill_graphs == ()
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _engine_options(EngineConfig(prefill_graphs=(512,)), tensor_parallel_size=2, **flags)


def test_kv_dtype_auto_follows_the_engine():
    assert resolve_kv_dtype("auto", model_dtype=torch.float32) == "float32"
    assert resolve_kv_dtype("auto", model_dtype=torch.bfloat16) == "bf16"
    assert resolve_kv_dtype("fp8_e4m3", model_dtype=torch.float32) == "fp8_e4m3"


def test_weights_as_loaded_from_headers(tiny_checkpoint):
    folder = tiny_checkpoint("moe", dtype=torch.bfloat16, multimodal=True)
    stored = weights_from_checkpoint(folder)
    assert weights_as_loaded(folder, float_bytes=2) == stored.text_bytes  # what `nvfp4kit plan` shows
    assert weights_as_loaded(folder, float_bytes=4) == 2 * stored.text_bytes  # loaded as float32


# ---- LLM on the tiny fixture -----------------------------------------------------------------------------


def test_llm_honours_kv_cache_memory(tiny_checkpoint, caplog):
    from nvfp4kit import LLM, SamplingParams

    with caplog.at_level(logging.INFO, logger="nvfp4kit.llm"):
        llm = LLM(tiny_checkpoint("moe"), kv_cache_memory="12MiB", max_model_len=256)
    plan = llm.startup_plan
    assert plan.kv_cache_memory == 12 * MiB
    block = llm.engine.layout.block_size
    assert llm.engine.pool_tokens == plan.pool.global_tokens // block * block > 256
    assert llm.engine.cache.nbytes() <= 12 * MiB
    assert "Engine memory plan" in caplog.text and "--kv-cache-memory 12.0 MiB" in caplog.text
    out = llm.generate("Hi", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_llm_sizes_from_device_memory_and_refuses_before_loading(tiny_checkpoint, monkeypatch):
    """The GPU path on the CPU: fake memory facts in, the planned pool out; too little memory fails fast."""
    from nvfp4kit import LLM
    from nvfp4kit import llm as llm_module

    folder = tiny_checkpoint("moe")
    card = DeviceMemory(total_bytes=4 * GiB, free_bytes=4 * GiB - 100 * MiB, name="fake")
    monkeypatch.setattr("nvfp4kit.engine.sizing.measure_device_memory", lambda device: card)
    llm = LLM(folder, gpu_memory_budget="500MiB", max_model_len=512)
    plan = llm.startup_plan
    assert plan.usable_bytes == 400 * MiB  # the 100 MiB in use at start count as our CUDA context
    assert plan.kv_cache_memory == 400 * MiB - plan.pool.weights_bytes - plan.pool.reserve.total > 0
    assert llm.engine.pool_tokens == plan.pool.global_tokens // 16 * 16

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the fits-check")

    monkeypatch.setattr(llm_module, "load_model", must_not_load)
    with pytest.raises(InsufficientMemoryError, match="does not fit"):
        LLM(folder, gpu_memory_budget="300MiB")  # the reserve (a 256 MiB margin, 64 MiB of graphs) is more


def test_the_vision_tower_is_planned_unless_language_model_only(tiny_checkpoint, monkeypatch):
    """A multimodal checkpoint's tower (as loaded, clip bounds fp32) and one image's encoder peak are held back
    from the KV cache; `language_model_only` gives them to the KV cache and refuses images."""
    import PIL  # noqa: F401  (a test extra)

    from nvfp4kit import LLM, SamplingParams
    from nvfp4kit.engine.sizing import vision_as_loaded

    folder = tiny_checkpoint("moe", multimodal=True, vision=True)
    card = DeviceMemory(total_bytes=4 * GiB, free_bytes=4 * GiB - 100 * MiB, name="fake")
    monkeypatch.setattr("nvfp4kit.engine.sizing.measure_device_memory", lambda device: card)
    with_images = LLM(folder, gpu_memory_budget="500MiB", max_model_len=512)
    text_only = LLM(folder, gpu_memory_budget="500MiB", max_model_len=512, language_model_only=True)
    tower = with_images.startup_plan.pool.vision
    assert tower == vision_as_loaded(folder, float_bytes=4) and tower.activation_bytes > 0  # fp32 on the CPU
    assert text_only.startup_plan.pool.vision is None
    assert text_only.startup_plan.kv_cache_memory == with_images.startup_plan.kv_cache_memory + tower.total
    assert "vision tower, GiB" in with_images.startup_plan.format()
    assert "vision tower" not in text_only.startup_plan.format()
    image = __import__("PIL.Image").Image.new("RGB", (40, 40), (200, 10, 10))
    prompt = {"prompt": "<|image|> what?", "multi_modal_data": {"image": image}}
    with pytest.raises(ValueError, match="text only"):
        text_only.generate(prompt, SamplingParams(max_tokens=1))
    assert "image_prompts" not in with_images.__dict__  # planned, but the tower loads at the first image


def test_a_plan_that_does_not_fit_names_the_vision_tower_and_the_way_out():
    raw = json.loads((PRESET_DIR / "gemma-4-26b-a4b.json").read_text())["config"]
    tower = vision_memory(raw)
    small = EngineConfig(kv_dtype="fp8_e5m2", max_num_seqs=1, max_model_len=4096, max_num_batched_tokens=512)
    budget = MemoryOptions.parse(gpu_memory_budget="15.5GiB")
    assert size(budget, config=small).pool.max_context == 4096  # text only it fits (as above) ...
    with pytest.raises(InsufficientMemoryError) as err:  # ... the 1.21 GiB tower and encoder do not
        size(budget, config=small, vision=tower)
    assert "vision tower 1.21 GiB" in str(err.value) and "--language-model-only" in str(err.value)
