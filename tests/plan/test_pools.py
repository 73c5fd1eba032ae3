import pytest

from nvfp4kit.config import load_preset
from nvfp4kit.plan.pools import default_sliding_chunk, plan_pools
from nvfp4kit.plan.report import build_plan
from nvfp4kit.plan.units import GiB
from nvfp4kit.plan.weights import weights_from_config

CFG = load_preset("gemma-4-26b-a4b")
WEIGHTS = weights_from_config(CFG).text_bytes


def plan(free=int(23.23 * GiB), **kw):
    return plan_pools(CFG, free_bytes=free, weights_bytes=WEIGHTS, **kw)


def test_budget_is_free_minus_weights_minus_reserve():
    p = plan()
    assert p.kv_budget_bytes == p.free_bytes - WEIGHTS - p.reserve.total
    r = p.reserve
    assert r.total == r.activations + r.logits + r.cuda_graphs + r.margin + r.scratch + r.rotated_keys
    assert 0.5 * GiB < r.total < 1.5 * GiB  # a 24 GB card: far less than SGLang's 9% (2.09 GiB)


def test_ring_is_window_plus_chunk_and_global_layers_store_k_once():
    p = plan(prefill_chunk=384)
    assert p.max_ring_tokens == 1024 + 384
    assert p.ring_bytes(p.max_ring_tokens) == 1408 * 102_400
    # a longer chunk attends the sliding layers in passes of 512 (engine/batch_context.py): the ring stays
    assert plan(prefill_chunk=8192).max_ring_tokens == 1024 + 512
    assert plan(prefill_chunk=8192, sliding_limit=2048).max_ring_tokens == 1024 + 2048
    assert p.kv.full == 5_120
    assert plan(k_eq_v_once=False).kv.full == 10_240


def test_a_24gb_card_serves_the_full_256k_context_and_several_long_requests():
    p = plan(context=262_144)
    assert p.fits and p.max_context == 262_144  # capped at max_position_embeddings
    assert p.requests_at_context >= 5
    assert p.global_tokens > 1_500_000
    # storing K and V separately halves the global pool
    assert plan(k_eq_v_once=False).global_tokens == pytest.approx(p.global_tokens / 2, rel=0.01)


def test_request_count_matches_request_bytes():
    p = plan(context=32_768)
    assert p.requests_at_context == p.kv_budget_bytes // (32_768 * 5_120 + (1024 + 512) * 102_400)
    short = plan(context=500)  # shorter than the ring: only its own tokens in the sliding layers
    assert short.request_bytes(500) == 500 * (5_120 + 102_400)


def test_more_concurrency_leaves_fewer_global_tokens():
    assert plan(concurrency=8).global_tokens < plan(concurrency=1).global_tokens


def test_too_small_a_gpu_does_not_fit():
    p = plan(free=int(14.5 * GiB))
    assert not p.fits and p.max_context == 0 and p.requests_at_context == 0 and p.global_tokens == 0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="prefill_chunk"):
        plan(prefill_chunk=0)
    with pytest.raises(ValueError, match="context"):
        plan(context=-5)


@pytest.mark.parametrize("preset", ["gemma-4-e2b", "gemma-4-12b", "gemma-4-26b-a4b", "gemma-4-31b"])
@pytest.mark.parametrize(("kv_dtype", "once"), [("fp8_e5m2", True), ("bf16", False)])
def test_plan_matches_the_engines_kv_layout(preset, kv_dtype, once):
    """The engine allocates exactly what the plan counts: global bytes per token and the sliding rings."""
    from nvfp4kit.engine.kv_pools import KVLayout, pool_bytes

    cfg = load_preset(preset)
    p = plan_pools(cfg, free_bytes=80 * GiB, weights_bytes=0, kv_dtype=kv_dtype, k_eq_v_once=once,
                   prefill_chunk=512, concurrency=4)  # fmt: skip
    layout = KVLayout(block_size=16, num_blocks=1, max_seqs=4, ring_size=p.max_ring_tokens, k_eq_v_once=once)
    assert pool_bytes(cfg, layout, kv_dtype) == (p.kv.full, 4 * p.ring_bytes(p.max_ring_tokens))


@pytest.mark.parametrize("preset", ["gemma-4-e2b", "gemma-4-12b", "gemma-4-26b-a4b", "gemma-4-31b"])
@pytest.mark.parametrize(("kv_dtype", "once"), [("fp8_e5m2", True), ("bf16", False), ("float32", True)])
def test_the_engines_kv_tensors_hold_what_the_plan_counts(preset, kv_dtype, once):
    """`pool_bytes` comes from the plan's per-token bytes; the tensors `KVCache` allocates add up to it."""
    from nvfp4kit.engine.kv_pools import KVCache, KVLayout, pool_bytes

    cfg = load_preset(preset)
    layout = KVLayout(block_size=16, num_blocks=3, max_seqs=2, ring_size=40, k_eq_v_once=once)
    per_token, rings = pool_bytes(cfg, layout, kv_dtype)
    cache = KVCache(cfg, layout, kv_dtype=kv_dtype, device="meta")
    assert cache.nbytes() == per_token * 3 * 16 + rings


def test_reserve_holds_the_weight_expansion_scratch_of_prefill_sized_chunks():
    from nvfp4kit.kernels.thresholds import DEQUANT_MIN_M, MOE_PREFILL_MIN_TOKENS
    from nvfp4kit.plan.pools import expansion_scratch_bytes

    assert expansion_scratch_bytes(CFG, DEQUANT_MIN_M - 1) == 0  # the Triton tiles read FP4 in place
    # from DEQUANT_MIN_M tokens the widest linear is expanded: a global layer's q/k/v, 16 x 512 + 2 x 2 x 512 wide
    assert expansion_scratch_bytes(CFG, DEQUANT_MIN_M) == 10_240 * 2_816 * 2
    # from MOE_PREFILL_MIN_TOKENS all 128 experts' [I, H] blocks share the same buffer: 507 MiB
    assert expansion_scratch_bytes(CFG, MOE_PREFILL_MIN_TOKENS) == 128 * 704 * 2_816 * 2
    small, large = plan(prefill_chunk=2048).reserve, plan(prefill_chunk=4096).reserve
    assert large.scratch - small.scratch == 128 * 704 * 2_816 * 2 - 10_240 * 2_816 * 2


def test_big_cards_attend_sliding_layers_in_passes_of_2048_small_ones_512():
    """Passes cost launches (26 ms more on a 1.6K-token cached chat turn on the H200 in passes of 512); their ring
    slots cost memory a 24 GB card needs for the global pool."""
    assert default_sliding_chunk(None) == 512  # the CPU
    assert default_sliding_chunk(24 * GiB) == 512
    assert default_sliding_chunk(80 * GiB) == 2048
    assert build_plan("gemma-4-26b-a4b", gpu="RTX 3090")["nvfp4kit"]["ring_tokens"] == 1024 + 512
    assert build_plan("gemma-4-26b-a4b", gpu="H200")["nvfp4kit"]["ring_tokens"] == 1024 + 2048
    assert build_plan("gemma-4-26b-a4b", gpu="H200", prefill_chunk=1024)["nvfp4kit"]["ring_tokens"] == 2048


def test_the_plan_reserves_the_prefill_graphs_the_engine_captures_by_default():
    """On 70+ GiB cards the engine captures prefill steps of up to 2048 tokens (`default_prefill_graphs`): their
    pool comes out of the KV budget in the plan as at start-up; a 24 GB card has none."""
    from nvfp4kit.plan.pools import DEFAULT_MAX_BATCH, default_prefill_graphs, runtime_reserve

    assert (
        default_prefill_graphs(80 * GiB) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
        and default_prefill_graphs(24 * GiB) == ()
    )
    cfg = load_preset("gemma-4-26b-a4b")
    h200 = build_plan("gemma-4-26b-a4b", gpu="H200")["nvfp4kit"]
    plain = runtime_reserve(
        cfg, free_bytes=h200["free_bytes"], prefill_chunk=8192, max_batch=DEFAULT_MAX_BATCH
    )
    assert h200["reserve"]["cuda_graphs"] > plain.cuda_graphs
    rtx = build_plan("gemma-4-26b-a4b", gpu="RTX 3090")["nvfp4kit"]
    plain = runtime_reserve(
        cfg, free_bytes=rtx["free_bytes"], prefill_chunk=2048, max_batch=DEFAULT_MAX_BATCH
    )
    assert rtx["reserve"]["cuda_graphs"] == plain.cuda_graphs


def test_the_plan_reserves_prerotated_keys_beyond_the_margins_share():
    """Long prompts on k_eq_v models write derived keys' rotated columns to a scratch (kernels/rotated_keys.py):
    2 KV heads x 128 columns x 2 bytes a key on 26B-A4B's global layers, 64 MiB at 128K keys, which the margin
    holds; longer contexts get the rest reserved, so a 256K prompt keeps the fast path. No k_eq_v, no scratch."""
    from nvfp4kit.engine.engine_config import EngineConfig
    from nvfp4kit.engine.kv_pools import sized_layout
    from nvfp4kit.plan.pools import rotated_keys_scratch_bytes, runtime_reserve

    cfg = load_preset("gemma-4-26b-a4b")
    assert rotated_keys_scratch_bytes(cfg, 131072) == 131072 * 2 * 128 * 2 == 64 * 2**20
    assert rotated_keys_scratch_bytes(load_preset("gemma-4-31b"), 131072) == 128 * 2**20  # 4 global KV heads
    assert rotated_keys_scratch_bytes(load_preset("gemma-4-e2b"), 131072) == 0  # K stored, not derived
    assert rotated_keys_scratch_bytes(cfg, 4096) == 0  # below the path's threshold

    def reserve(context):
        return runtime_reserve(cfg, free_bytes=24 * GiB, prefill_chunk=2048, max_batch=8, context=context)

    assert reserve(131072).rotated_keys == 0
    assert reserve(262144).rotated_keys == 64 * 2**20
    assert reserve(262144).total == reserve(131072).total + 64 * 2**20
    assert build_plan("gemma-4-26b-a4b", gpu="RTX 3090")["nvfp4kit"]["reserve"]["rotated_keys"] == 64 * 2**20
    config = EngineConfig(max_num_batched_tokens=2048, num_kv_tokens=4096)
    assert sized_layout(cfg, config, 262144, "fp8_e5m2")[0].rotated_keys_budget == 128 * 2**20
    assert sized_layout(cfg, config, 32768, "fp8_e5m2")[0].rotated_keys_budget == 64 * 2**20
