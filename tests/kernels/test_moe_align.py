"""moe_align groups every (token, slot) pair under its expert in padded blocks; all methods agree."""

import pytest
import torch

from nvfp4kit.kernels import moe_align as align_module
from nvfp4kit.kernels.moe_align import max_blocks, moe_align

from .helpers import DEVICE

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU


def _check_layout(
    ids: torch.Tensor, pair_ids: torch.Tensor, block_expert: torch.Tensor, *, experts: int, bm: int
):
    flat = ids.reshape(-1).cpu()
    pairs = flat.numel()
    pair_ids, block_expert = pair_ids.cpu(), block_expert.cpu()
    assert block_expert.numel() == max_blocks(pairs, experts, bm)
    counts = torch.bincount(flat, minlength=experts)
    used = int(((counts + bm - 1) // bm).sum())
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    assert (block_expert[:used].diff() >= 0).all()  # experts in order
    assert (pair_ids[used * bm :] == pairs).all()
    real = pair_ids[pair_ids < pairs]
    assert torch.equal(real.sort().values, torch.arange(pairs, dtype=torch.int32))  # each pair exactly once
    for b in range(used):
        rows = pair_ids[b * bm : (b + 1) * bm]
        rows = rows[rows < pairs].long()
        assert rows.numel() > 0 and (flat[rows] == block_expert[b]).all()
    per_expert: dict[int, set[int]] = {}
    for b in range(used):
        per_expert.setdefault(int(block_expert[b]), set()).update(pair_ids[b * bm : (b + 1) * bm].tolist())
    return per_expert


@pytest.mark.parametrize(
    "tokens,top_k,experts,bm",
    [(1, 8, 128, 16), (7, 2, 5, 4), (37, 3, 8, 16), (150, 8, 128, 16), (300, 8, 128, 64)],
)
def test_align_methods_agree(tokens, top_k, experts, bm, monkeypatch):
    monkeypatch.setattr(align_module, "CHUNK_PAIRS", 64)  # several chunks, one partly filled, at small sizes
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
    ids[:, 0] = ids[:, 0] % max(1, experts // 2)  # skew: some experts busy, some idle
    blocks = {}
    for method in ("triton", "experts", "chunked", "torch"):
        pair_ids, block_expert = moe_align(ids, num_experts=experts, block_m=bm, method=method)
        blocks[method] = (
            _check_layout(ids, pair_ids, block_expert, experts=experts, bm=bm),
            block_expert.cpu(),
            pair_ids.cpu(),
        )
    for method in ("triton", "experts", "chunked"):
        assert torch.equal(blocks[method][1], blocks["torch"][1])
        assert blocks[method][0] == blocks["torch"][0]  # same pairs per expert (order inside may differ)
    assert torch.equal(
        blocks["experts"][2], blocks["torch"][2]
    )  # no atomics: pairs in order, as a stable sort


def test_align_empty_and_unknown_method():
    ids = torch.empty(0, 8, dtype=torch.int64, device=DEVICE)
    pair_ids, block_expert = moe_align(ids, num_experts=128, block_m=16)
    assert pair_ids.numel() == 0 and block_expert.numel() == 0
    with pytest.raises(ValueError, match="align method"):
        moe_align(
            torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), num_experts=4, block_m=16, method="cub"
        )


def test_one_compiled_variant_serves_every_step_size(monkeypatch):
    """Counts that change with the step's tokens reach the align kernel unspecialised, so the warm-up's one step
    per tile class compiles what serving meets (the H100 compiled a second variant mid-serving when a step's
    slot count, blocks x 8, was not a multiple of 16: tests/gpu/test_warmup_cuda.py)."""
    from triton.runtime.interpreter import InterpretedFunction

    from ..triton_variants import record_variants

    if not isinstance(align_module._moe_align_kernel, InterpretedFunction):
        pytest.skip(
            "the kernels are compiled here (no TRITON_INTERPRET): tests/gpu/test_warmup_cuda.py counts"
        )
    keys = record_variants(monkeypatch)
    for tokens in range(1, 33):  # 2-64 pairs: one CHUNK class (64)
        for bm in (8, 16):  # the expert-grouped fragment MoE's blocks
            ids = torch.randint(0, 8, (tokens, 2), dtype=torch.int32)
            for method in ("triton", "experts"):
                moe_align(ids, num_experts=8, block_m=bm, method=method)
    kernels = {(key[0], dict(key[-1])["BM"]) for key in keys}  # constexprs come as keywords
    assert len(keys) == len(kernels) == 4, sorted(keys, key=str)


def test_the_environment_overrides_every_callers_method(monkeypatch):
    """`NVFP4KIT_MOE_ALIGN` (read at import into OVERRIDE) wins over the method a caller or a MoE config names."""
    ids = torch.tensor([[0, 1], [1, 2], [3, 0]], device=DEVICE)
    calls = []
    monkeypatch.setattr(align_module, "OVERRIDE", "experts")
    monkeypatch.setattr(align_module, "_align_experts", lambda flat, *rest: calls.append(flat.numel()))
    moe_align(ids, num_experts=4, block_m=4)
    moe_align(ids, num_experts=4, block_m=4, method="torch")
    assert calls == [6, 6]
    monkeypatch.setattr(align_module, "OVERRIDE", "bitonic")
    with pytest.raises(ValueError, match="align method 'bitonic'"):
        moe_align(ids, num_experts=4, block_m=4)
