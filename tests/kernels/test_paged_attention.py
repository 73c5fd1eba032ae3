"""Triton KV writes and paged/ring attention against float64 torch math, on tiny shapes.

Each case fills a pool with random history for several sequences (different lengths; rings that wrapped;
paged blocks in shuffled order), runs the kernel on a poisoned output and compares every written row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl

from nvfp4kit.config import RopeConfig
from nvfp4kit.kernels.attention_launch import paged_prefill_block_q
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.kv_write import write_kv
from nvfp4kit.kernels.paged_attention import DerivedKey, paged_attention
from nvfp4kit.kernels.prefill_attention import prefill_attention
from nvfp4kit.kernels.rope_angles import cos_sin
from nvfp4kit.kernels.rotated_keys import prefill_key_rows, rotate_derived_keys
from nvfp4kit.model.layers import apply_rope, attention, rope_cos_sin, rope_inv_freq

from .helpers import rel_error  # inf when a row is left unwritten (the output starts as NaN)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PROPORTIONAL = RopeConfig("proportional", 1_000_000.0, 0.25)
DEFAULT_ROPE = RopeConfig("default", 10_000.0, 1.0)


@dataclass
class Case:
    seqs: list[tuple[int, int]]  # (first position this step, query tokens)
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    window: int | None = None  # sliding layer: ring storage
    kv_dtype: torch.dtype = torch.float32
    q_dtype: torch.dtype = torch.float32
    rope: RopeConfig | None = None  # derive K from V (k_eq_v layer)
    scale: float = 1.0
    block_size: int = 4
    chunk: int = 16  # ring = window + chunk
    seed: int = 0
    spans: dict[int, tuple[tuple[int, int], ...]] | None = None  # per sequence: image spans seen both ways
    stale_nan: bool = False  # slots no key of this step lives in hold NaN (else random values)


def _slots(case, table, i, pos):
    if case.window is not None:
        return i * (case.window + case.chunk) + pos % (case.window + case.chunk)
    return table[i][pos // case.block_size] * case.block_size + pos % case.block_size


def run_case(
    case: Case,
    *,
    num_splits: int = 1,
    extra_padding_seq: bool = False,
    prefill_config=None,
    prerotate=False,
):
    """Returns (kernel output, float64 reference). `prefill_config`: run the prefill kernel with these tiles
    (every sequence must have more than one query token) instead of the paged kernel; `prerotate`: with derived
    keys computed beforehand (`rotated_keys.rotate_derived_keys`)."""
    gen = torch.Generator().manual_seed(case.seed)
    seqs = list(case.seqs) + ([(0, 0)] if extra_padding_seq else [])
    num = len(seqs)
    ends = [s + n for s, n in seqs]
    max_blocks = max(-(-e // case.block_size) for e in ends) or 1
    blocks = torch.randperm(num * max_blocks + 3, generator=gen)
    table = blocks[: num * max_blocks].view(num, max_blocks)
    rows = (
        num * (case.window + case.chunk)
        if case.window is not None
        else (num * max_blocks + 3) * case.block_size
    )
    shape = (rows, case.kv_heads, case.head_dim)
    v_store = torch.randn(shape, generator=gen).to(case.kv_dtype)  # stale data everywhere else
    k_store = None if case.rope else torch.randn(shape, generator=gen).to(case.kv_dtype)
    if case.stale_nan:
        v_store.fill_(float("nan"))
        if k_store is not None:
            k_store.fill_(float("nan"))
    for i, end in enumerate(ends):  # history in position order: rings keep only the newest positions
        pos = torch.arange(end)
        v_store[_slots(case, table, i, pos)] = (torch.randn(end, *shape[1:], generator=gen) / case.scale).to(
            case.kv_dtype
        )
        if k_store is not None:
            k = torch.randn(end, *shape[1:], generator=gen) / case.scale
            k_store[_slots(case, table, i, pos)] = k.to(case.kv_dtype)
    tokens = sum(n for _, n in seqs)
    q = torch.randn(tokens, case.q_heads, case.head_dim, generator=gen).to(case.q_dtype)
    offsets = [sum(n for _, n in seqs[:i]) for i in range(num)]
    derived = None
    if case.rope:
        weight = torch.rand(case.head_dim, generator=gen) + 0.5
        inv_freq = rope_inv_freq(case.rope, case.head_dim)
        derived = DerivedKey(weight, inv_freq, int((inv_freq != 0).sum()))

    ref = torch.zeros(tokens, case.q_heads, case.head_dim, dtype=torch.float64)
    for i, (start, n) in enumerate(seqs):
        if n == 0:
            continue
        lo = max(0, start - case.window + 1) if case.window is not None else 0
        hist = torch.arange(lo, start + n)
        values = v_store[_slots(case, table, i, hist)].double() * case.scale
        if derived is not None:
            cos, sin = rope_cos_sin(derived.inv_freq.double(), hist, torch.float64)
            keys = apply_rope(values * derived.k_norm_weight.double(), cos, sin)
        else:
            keys = k_store[_slots(case, table, i, hist)].double() * case.scale
        rows_i = slice(offsets[i], offsets[i] + n)
        spans = (case.spans or {}).get(i, ())
        if spans:  # a query of an image also sees the later keys of its image
            hist = torch.arange(lo, max([start + n] + [b for _, b in spans]))
            values = v_store[_slots(case, table, i, hist)].double() * case.scale
            keys = k_store[_slots(case, table, i, hist)].double() * case.scale
        ref[rows_i] = attention(
            q[rows_i].double(), keys, values, q_positions=torch.arange(start, start + n), k_positions=hist,
            window=case.window, bidirectional=spans,
        )  # fmt: skip

    def dev(x):
        return torch.tensor(x, dtype=torch.int32, device=DEVICE)

    batch = AttentionBatch(
        dev([s for s, _ in seqs]), dev([n for _, n in seqs]), dev(offsets), table.int().to(DEVICE),
        dev(list(range(num))),
    )  # fmt: skip
    decode = all(n <= 1 for _, n in seqs)
    block_q = 1 if decode else paged_prefill_block_q(case.head_dim, case.q_heads // case.kv_heads)
    if prefill_config is not None:
        block_q = prefill_config.block_q
    item_seq, item_q0 = [], []
    for i, (_, n) in enumerate(seqs):
        for q0 in range(0, max(n, 1), block_q):
            item_seq.append(i)
            item_q0.append(q0)
    items = WorkItems(dev(item_seq), dev(item_q0), block_q)
    out = torch.full_like(q, float("nan"), device=DEVICE)
    if derived is not None:
        derived = DerivedKey(
            derived.k_norm_weight.to(DEVICE), derived.inv_freq.to(DEVICE), derived.rotary_pairs
        )
    where = (
        {"ring_size": case.window + case.chunk}
        if case.window is not None
        else {"block_size": case.block_size}
    )
    kernel = dict(num_splits=num_splits)
    kernel = kernel if prefill_config is None else dict(config=prefill_config)
    if prerotate:
        first, total, most = prefill_key_rows([s for s, _ in seqs], [n for _, n in seqs])
        kernel["rotated_keys"] = rotate_derived_keys(
            q.to(DEVICE), v_store.to(DEVICE), derived, batch, block_size=case.block_size, first_row=dev(first),
            total_rows=total, max_keys=most,
        )  # fmt: skip
    if case.spans:
        limit = [s + t for s, n in seqs for t in range(n)]
        for i, spans in case.spans.items():
            for a, b in spans:
                for pos in range(max(a, seqs[i][0]), min(b, seqs[i][0] + seqs[i][1])):
                    limit[offsets[i] + pos - seqs[i][0]] = b - 1
        kernel["key_limit"] = dev(limit)
    (paged_attention if prefill_config is None else prefill_attention)(
        q.to(DEVICE), v_store=v_store.to(DEVICE), k_store=None if k_store is None else k_store.to(DEVICE),
        batch=batch, items=items, window=case.window, v_scale=case.scale, k_scale=case.scale,
        derived_key=derived, out=out, **where, **kernel,
    )  # fmt: skip
    return out.cpu(), ref


def bound(case: Case) -> float:
    if case.q_dtype == torch.bfloat16:
        return 1e-2
    return 1e-5  # fp32 queries; the KV values are exactly representable in every pool dtype


GLOBAL = dict(q_heads=4, kv_heads=1, head_dim=32)  # the 26B-A4B global shape in small: GQA 4:1, wider heads


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, *FP8], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_over_paged_pool(kv_dtype, num_splits):
    case = Case([(0, 1), (4, 1), (36, 1), (69, 1)], kv_dtype=kv_dtype, scale=0.5, **GLOBAL)
    out, ref = run_case(case, num_splits=num_splits)
    assert rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_over_ring_longer_than_window(num_splits):
    # positions 0..70 went through a 24-slot ring: only the window's keys may be read
    case = Case([(2, 1), (9, 1), (70, 1)], window=8, kv_dtype=torch.bfloat16)
    out, ref = run_case(case, num_splits=num_splits)
    assert rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("sliding", [True, False], ids=["ring", "paged"])
def test_decode_ignores_non_finite_stale_slots(kv_dtype, sliding):
    """The last key tile of a sequence also covers slots past its keys (another request's history, or garbage):
    with stored K those rows read the last key's slot and both tiles load unmasked (`load_kv_tile_unmasked`), derived K
    masks its V tile. NaN in every such slot must not reach the output."""
    layout = dict(window=8, chunk=8) if sliding else GLOBAL
    case = Case([(0, 1), (5, 1), (15, 1), (40, 1)], kv_dtype=kv_dtype, stale_nan=True, **layout)
    for splits in (1, 2):
        out, ref = run_case(case, num_splits=splits)
        assert torch.isfinite(out).all() and rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("sliding", [True, False], ids=["ring", "paged"])
def test_chunked_prefill_with_history(sliding):
    # a first chunk, a later chunk (history + causal chunk), and a decode row in the same launch
    layout = dict(window=8, chunk=24) if sliding else GLOBAL
    case = Case([(0, 20), (13, 9), (40, 1)], kv_dtype=torch.float8_e4m3fn, scale=0.25, **layout)
    out, ref = run_case(case)
    assert rel_error(out, ref) < bound(case)


@pytest.mark.parametrize("rope", [PROPORTIONAL, DEFAULT_ROPE], ids=["proportional", "default"])
@pytest.mark.parametrize("seqs", [[(0, 1), (7, 1), (60, 1)], [(0, 12), (30, 7)]], ids=["decode", "prefill"])
def test_derived_keys_from_stored_values(rope, seqs):
    case = Case(seqs, rope=rope, kv_dtype=torch.float8_e4m3fn, scale=0.5, **GLOBAL)
    out, ref = run_case(case, num_splits=2 if seqs[0][1] == 1 else 1)
    assert rel_error(out, ref) < bound(case)


@triton.jit
def _cos_sin_probe(angle_ptr, out_ptr, N: tl.constexpr):
    cols = tl.arange(0, N)
    cos, sin = cos_sin(tl.load(angle_ptr + cols))
    tl.store(out_ptr + cols, cos)
    tl.store(out_ptr + N + cols, sin)


def test_rope_angles_of_long_contexts_stay_accurate():
    # derived keys at position p rotate by p * inv_freq rad; at 256K positions that is up to 2.6e5 rad
    pos = torch.tensor([0, 1, 1023, 32_767, 131_071, 200_003, 262_143], dtype=torch.float32)
    inv_freq = rope_inv_freq(PROPORTIONAL, 512)[:64:9]
    angles = (pos[:, None] * inv_freq[None, :]).flatten()
    angles = torch.cat([angles, torch.zeros(64 - angles.numel())]).to(DEVICE)
    out = torch.empty(128, device=DEVICE)
    _cos_sin_probe[(1,)](angles, out, N=64)
    exact = angles.cpu().double()
    assert (out[:64].cpu().double() - exact.cos()).abs().max() < 2e-6
    assert (out[64:].cpu().double() - exact.sin()).abs().max() < 2e-6


@pytest.mark.parametrize("rope", [None, PROPORTIONAL], ids=["stored_k", "derived_k"])
def test_bf16_queries(rope):
    case = Case([(0, 5), (17, 1)], q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, rope=rope, **GLOBAL)
    out, ref = run_case(case)
    assert rel_error(out, ref) < bound(case)


def test_padding_sequence_writes_nothing():
    case = Case([(3, 1), (20, 1)], window=8)
    out, ref = run_case(case, num_splits=2, extra_padding_seq=True)
    assert rel_error(out, ref) < bound(case)  # every real row written; the padding sequence has no rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, *FP8], ids=str)
def test_write_kv_matches_torch_conversion_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    tokens, heads, dim = 29, 2, 16
    # magnitudes from 1e-5 to 300: FP8 subnormals, normals and (E4M3) near the top of the range
    v = torch.randn(tokens, heads, dim, generator=gen) * torch.logspace(-5, 2.5, tokens)[:, None, None]
    k = torch.randn(tokens, heads, dim, generator=gen).bfloat16()
    slots = torch.randperm(40, generator=gen)[:tokens]
    slots[5] = -1  # padding: skipped
    scale = 1.0 if dtype == torch.float32 else 0.75
    stores = [torch.zeros(40, heads, dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    write_kv(
        v.to(DEVICE), k=k.to(DEVICE), slots=slots.to(DEVICE), v_store=stores[0], k_store=stores[1],
        v_scale=scale, k_scale=scale,
    )  # fmt: skip
    keep = slots >= 0
    top = torch.finfo(dtype).max
    for store, x in zip(stores, (v, k)):
        expected = torch.zeros(40, heads, dim, dtype=dtype)
        expected[slots[keep]] = (x[keep].float() / scale).clamp(-top, top).to(dtype)  # the kernel saturates
        assert torch.equal(store.cpu().view(torch.uint8), expected.view(torch.uint8))
    if dtype == torch.float8_e4m3fn:
        assert (v.abs() / scale > top).any()  # saturation was exercised


def test_write_kv_v_only_and_bad_arguments():
    v = torch.randn(3, 1, 32, device=DEVICE)
    store = torch.zeros(8, 1, 32, dtype=torch.bfloat16, device=DEVICE)
    write_kv(v, k=None, slots=torch.tensor([7, 0, 2], device=DEVICE), v_store=store, k_store=None)
    assert torch.equal(store[[7, 0, 2]].cpu(), v.bfloat16().cpu())
    with pytest.raises(ValueError, match="k and k_store together"):
        write_kv(v, k=v, slots=torch.zeros(3, dtype=torch.long, device=DEVICE), v_store=store, k_store=None)
    with pytest.raises(ValueError, match="slots has shape"):
        write_kv(
            v, k=None, slots=torch.zeros(2, dtype=torch.long, device=DEVICE), v_store=store, k_store=None
        )


def test_attention_argument_errors_name_the_problem():
    q = torch.zeros(1, 4, 32, device=DEVICE)
    pool = torch.zeros(8, 2, 32, device=DEVICE)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    batch = AttentionBatch(one, one + 1, one, one.view(1, 1), one)
    items = WorkItems(one, one, 1)
    with pytest.raises(ValueError, match="exactly one of ring_size"):
        paged_attention(
            q, v_store=pool, k_store=pool, batch=batch, items=items, window=None, ring_size=8, block_size=4
        )
    with pytest.raises(ValueError, match="derived_key"):
        paged_attention(q, v_store=pool, k_store=None, batch=batch, items=items, window=None, block_size=4)
    with pytest.raises(ValueError, match="head_dim 24"):
        bad = torch.zeros(1, 4, 24, device=DEVICE)
        paged_attention(bad, v_store=pool[..., :24], k_store=pool[..., :24], batch=batch, items=items,
                        window=None, block_size=4)  # fmt: skip


@pytest.mark.parametrize("window", [None, 8], ids=["paged", "ring"])
def test_splits_past_the_keys_are_neither_stored_nor_merged(window, monkeypatch):
    """Decode graphs are captured with the split count of the longest context: at a short one most splits hold no
    keys. Those store nothing and the merge reads only the splits that held keys, so the partial buffers may start
    as anything (NaN here) without reaching the output."""
    import nvfp4kit.kernels.paged_attention as pa

    real_empty = torch.empty
    monkeypatch.setattr(pa.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    layout = dict(window=window) if window else GLOBAL
    case = Case([(0, 1), (5, 1), (70, 1)], kv_dtype=torch.bfloat16, **layout)
    out, ref = run_case(case, num_splits=16)  # 1 to 71 keys in up to 16 splits of >= one key tile each
    assert not out.isnan().any() and rel_error(out, ref) < bound(case)
