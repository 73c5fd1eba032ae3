"""The prefill flash-attention kernel against float64 torch math, on awkward shapes (tiny, interpreted on the CPU).

Tiles are chosen explicitly so that query tiles, key tiles, pool blocks and windows all fall out of step: chunk
boundaries inside a tile, windows starting mid-block, prompts of 2 and of window +- 1 tokens, 512-style column
slices (dv_splits), GQA groups that are not a power of two.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.prefill_attention import PrefillConfig, prefill_attention, prefill_config

from .helpers import DEVICE, ON_GPU, rel_error
from .test_paged_attention import DEFAULT_ROPE, FP8, GLOBAL, PROPORTIONAL, Case, bound, run_case

# tensor-core dots need 16 keys a tile on a GPU; the interpreter takes the small tiles that put window and chunk
# edges mid-tile
MIN_BLOCK_N = 16 if ON_GPU else 1


def tiles(block_q: int = 4, block_n: int = 8, dv_splits: int = 1) -> PrefillConfig:
    return PrefillConfig(
        block_q=block_q, block_n=max(block_n, MIN_BLOCK_N), dv_splits=dv_splits, num_warps=4, num_stages=1
    )


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, *FP8], ids=str)
def test_first_chunks_and_later_chunks_over_a_paged_pool(kv_dtype):
    # a whole prompt, a later chunk on top of history, and the shortest prefill (2 tokens)
    case = Case([(0, 19), (13, 9), (40, 2)], kv_dtype=kv_dtype, scale=0.5, **GLOBAL)
    out, ref = run_case(case, prefill_config=tiles())
    assert rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("start,length", [(0, 7), (0, 9), (0, 8), (3, 17), (21, 12), (50, 5)])
def test_sliding_window_edges_over_a_ring(start, length):
    # window 8: prompts of window - 1, window + 1 and window tokens, and chunks whose window starts mid-tile
    case = Case([(start, length)], window=8, chunk=24, kv_dtype=torch.float8_e4m3fn, scale=0.25)
    out, ref = run_case(case, prefill_config=tiles(block_q=4, block_n=4))
    assert rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("rope", [PROPORTIONAL, DEFAULT_ROPE], ids=["proportional", "default"])
@pytest.mark.parametrize("dv_splits", [1, 2])
def test_derived_keys_and_column_slices(rope, dv_splits):
    # the k_eq_v global layer: K derived from stored V; each column slice recomputes the full scores
    case = Case([(0, 12), (30, 7), (5, 3)], rope=rope, kv_dtype=torch.float8_e5m2, scale=0.5, **GLOBAL)
    out, ref = run_case(case, prefill_config=tiles(block_q=2, block_n=8, dv_splits=dv_splits))
    assert rel_error(out, ref) < bound(case)


def test_group_not_a_power_of_two_and_bf16_queries():
    case = Case([(0, 11), (6, 6)], q_heads=6, kv_heads=2, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    out, ref = run_case(case, prefill_config=tiles(block_q=2, block_n=4))
    assert rel_error(out, ref) < bound(case)


def test_the_default_tiles_on_this_machine():
    case = Case([(0, 40), (9, 31)], window=16, chunk=32, kv_dtype=torch.bfloat16)
    out, ref = run_case(case, prefill_config=prefill_config(case.head_dim, case.q_heads // case.kv_heads))
    assert rel_error(out, ref) < bound(case)


def test_bad_arguments_name_the_problem():
    q = torch.zeros(4, 4, 16, device=DEVICE)
    pool = torch.zeros(8, 2, 16, device=DEVICE)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="work items of"):  # items built for 4-token tiles, the kernel told 2
        batch = AttentionBatch(one, one + 4, one, one.view(1, 1), one)
        prefill_attention(
            q, v_store=pool, k_store=pool, batch=batch, items=WorkItems(one, one, 4), window=None,
            block_size=4, config=tiles(block_q=2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="column slices"):
        run_case(Case([(0, 4)], head_dim=16), prefill_config=tiles(dv_splits=3))


@pytest.mark.parametrize(
    "spans", [((3, 9),), ((0, 4), (10, 17)), ((25, 30),)], ids=["one", "two", "in-history"]
)
def test_image_tokens_see_their_whole_image(spans):
    # sliding layers: a query inside an image span also sees the image's later keys (within the window)
    case = Case([(0, 20), (20, 14)], window=8, chunk=24, kv_dtype=torch.bfloat16, spans={0: spans, 1: spans})
    out, ref = run_case(case, prefill_config=tiles(block_q=4, block_n=4))
    assert rel_error(out, ref) < bound(case)


def test_tiles_too_big_for_the_card_fall_back_to_the_next(monkeypatch):
    import triton

    from nvfp4kit.kernels import prefill_attention as pa

    small = tiles(block_q=4, block_n=4)
    big = tiles(block_q=4, block_n=2 * small.block_n)
    launches = []
    real = pa._prefill_attention_kernel

    class TooBigForTheLargerTile:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["BLOCK_N"])
                if kw["BLOCK_N"] == big.block_n:
                    raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(pa, "_prefill_attention_kernel", TooBigForTheLargerTile())
    monkeypatch.setattr(pa, "prefill_configs", lambda head_dim, group, capability=None: [big, small])
    monkeypatch.setattr(pa, "_TOO_BIG", set())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 16, generator=gen).to(DEVICE)
    pool = torch.randn(8, 2, 16, generator=gen).to(DEVICE)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    batch = AttentionBatch(one, one + 6, one, torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE), one)
    items = WorkItems(
        torch.zeros(2, dtype=torch.int32, device=DEVICE),
        torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
        4,
    )
    kwargs = dict(v_store=pool, k_store=pool, batch=batch, items=items, window=None, block_size=4)
    first = pa.prefill_attention(q, **kwargs)
    again = pa.prefill_attention(q, **kwargs)
    assert launches == [big.block_n, small.block_n, small.block_n]  # the big tile failed once, then skipped
    monkeypatch.setattr(pa, "_prefill_attention_kernel", real)
    expected = pa.prefill_attention(q, config=small, **kwargs)
    assert torch.equal(first, expected) and torch.equal(again, expected)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, *FP8], ids=str)
@pytest.mark.parametrize("rope", [PROPORTIONAL, DEFAULT_ROPE], ids=["proportional", "default"])
def test_prerotated_keys_give_the_in_kernel_derivation(kv_dtype, rope):
    # long prefill chunks read derived K's rotated columns from a scratch written once per step; a later chunk on
    # history, a whole prompt and the shortest prefill, tiles out of step with blocks and chunks
    case = Case([(13, 9), (0, 19), (40, 2)], rope=rope, kv_dtype=kv_dtype, scale=0.5, **GLOBAL)
    config = tiles(block_q=2, block_n=8)
    pre, ref = run_case(case, prefill_config=config, prerotate=True)
    derived, _ = run_case(case, prefill_config=config)
    assert rel_error(pre, ref) < bound(case)
    assert rel_error(pre, derived) < 1e-6  # fp32 dots here: only the order of the sums differs


def test_rotated_key_rows_skip_decode_sequences_and_hold_rope_of_v_times_w():
    from nvfp4kit.kernels.attention_pools import pool_operands
    from nvfp4kit.kernels.paged_attention import DerivedKey
    from nvfp4kit.kernels.rotated_keys import prefill_key_rows, rotate_derived_keys
    from nvfp4kit.model.layers import apply_rope, rope_cos_sin, rope_inv_freq

    starts, lengths = [5, 30, 0], [6, 1, 3]  # the middle sequence decodes: no rows of its own
    first, total, most = prefill_key_rows(starts, lengths)
    assert (first, total, most) == ([0, -1, 11], 14, 11)
    gen = torch.Generator().manual_seed(3)
    head_dim, kv_heads, block_size = 32, 2, 4
    table = torch.randperm(3 * 8, generator=gen).view(3, 8).int()
    pool = torch.randn(3 * 8 * block_size, kv_heads, head_dim, generator=gen).to(torch.float8_e4m3fn)
    inv_freq = rope_inv_freq(PROPORTIONAL, head_dim)
    weight = torch.rand(head_dim, generator=gen) + 0.5
    key = DerivedKey(weight, inv_freq, int((inv_freq != 0).sum()))
    ints = [
        torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (starts, lengths, [0, 6, 7], [0, 1, 2])
    ]
    batch = AttentionBatch(ints[0], ints[1], ints[2], table.to(DEVICE), ints[3])
    q = torch.zeros(10, 4, head_dim, device=DEVICE)
    on_device = DerivedKey(weight.to(DEVICE), inv_freq.to(DEVICE), key.rotary_pairs)
    got = rotate_derived_keys(
        q, pool.to(DEVICE), on_device, batch, block_size=block_size,
        first_row=torch.tensor(first, dtype=torch.int32, device=DEVICE), total_rows=total, max_keys=most,
    )  # fmt: skip
    rot = got.values.shape[-1] // 2
    unit = pool_operands(
        q, pool.to(DEVICE), None, on_device
    ).unit  # 256 where E4M3 is read as fp16 bits (value / 256)
    assert got.values.shape == (14, kv_heads, 2 * rot) and got.values.dtype == torch.float32
    for i in (0, 2):
        pos = torch.arange(starts[i] + lengths[i])
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        cos, sin = rope_cos_sin(inv_freq.double(), pos, torch.float64)
        keys = apply_rope(pool[slots].double() * weight.double(), cos, sin)
        want = torch.cat([keys[..., :rot], keys[..., head_dim // 2 : head_dim // 2 + rot]], -1)
        rows = got.values[first[i] : first[i] + len(pos)].double().cpu() * unit
        assert (rows - want).abs().max() < 1e-4 * want.abs().max()
