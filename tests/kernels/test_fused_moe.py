"""Fused GELU-tanh MoE against the torch reference backend: every launch mode, idle experts, dense weights."""

import functools
import warnings

import pytest
import torch

from nvfp4kit.kernels.configs import MoEConfig, heuristic_moe_config, interpreting
from nvfp4kit.kernels.fused_moe import fused_moe
from nvfp4kit.model.ops import TorchBackend

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, ON_GPU, random_experts, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU

E, H, INTER = 6, 80, 48  # H and INTER multiples of 16, not powers of two
TILES = dict(gate_up_block_n=32, gate_up_block_k=64, down_block_n=32, down_block_k=32)
MODES = {
    "pair_token": MoEConfig(sorted=False, **TILES),
    "pair_pair": MoEConfig(sorted=False, down_mode="pair", **TILES),
    "sorted_experts": MoEConfig(block_m=16, **TILES),  # the default align: a program an expert, no atomics
    "sorted_triton": MoEConfig(block_m=16, align="triton", **TILES),  # one program with atomics
    "sorted_torch": MoEConfig(block_m=16, align="torch", **TILES),
    # nibble halves (even / odd K columns, two MMAs): the same products in another order
    "sorted_halves": MoEConfig(block_m=16, halves=True, **TILES),
    "pair_halves": MoEConfig(sorted=False, down_mode="pair", halves=True, **TILES),
    # K splits that leave a ragged last tile (H = 80 = 2.5 x 32), CUDA-core and tensor-core products
    "split_k2": MoEConfig(split=True, gate_up_split_k=2, **{**TILES, "gate_up_block_k": 32}),
    "split_k3": MoEConfig(split=True, gate_up_split_k=3, **{**TILES, "gate_up_block_k": 32}),
    "split_whole_k": MoEConfig(split=True, **TILES),
    # the down projection's K split too (INTER = 48 = 1.5 x 32: a ragged last tile), partials met per slot
    "split_down2": MoEConfig(
        split=True, gate_up_split_k=2, down_split_k=2, **{**TILES, "gate_up_block_k": 32}
    ),
    "split_halves": MoEConfig(split=True, gate_up_split_k=2, halves=True, **{**TILES, "gate_up_block_k": 32}),
}


@pytest.fixture(scope="module")
def experts():
    return random_experts(E, 2 * INTER, H, seed=1), random_experts(E, H, INTER, seed=2)


# bf16 rounds twice inside the MoE (the activation between the GEMMs, then the output): over 12 random inputs the
# 16-token case reached 9.6e-3 against the fp32 reference, too close to the 1e-2 used for one rounding
MOE_BF16_BOUND = 2 * BF16_BOUND


def _routing(tokens: int, top_k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 2] = -1e4  # expert 2 never gets a token
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    return ids.to(DEVICE), (weights * 1.5).to(DEVICE)  # not renormalised: weights must be applied as given


def _check(x, ids, weights, gate_up, down, config, bound):
    with warnings.catch_warnings():
        # the interpreter's exp overflows for very negative gates
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fused_moe(x, ids, weights, gate_up, down, config=config)
    ref = TorchBackend().moe(x.float(), ids, weights.float(), gate_up, down)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < bound


@pytest.mark.parametrize(
    "mode,tokens,top_k",
    [
        ("pair_token", 1, 2),
        ("pair_token", 3, 3),
        ("pair_pair", 2, 1),
        ("sorted_triton", 7, 2),
        ("sorted_experts", 33, 3),
        ("sorted_torch", 16, 2),
        ("sorted_experts", 21, 3),
        ("split_k2", 1, 3),
        ("split_k2", 5, 2),
        ("split_k3", 2, 3),
        ("split_k3", 3, 1),
        ("split_whole_k", 4, 2),
        ("split_down2", 1, 1),
        ("split_down2", 3, 3),
        ("split_halves", 1, 2),
        ("split_halves", 4, 3),
    ],
)
def test_moe_modes_match_reference(experts, mode, tokens, top_k):
    ids, weights = _routing(tokens, top_k, seed=tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    _check(x, ids, weights, *experts, MODES[mode], FP32_BOUND)
    _check(x.bfloat16(), ids, weights, *experts, MODES[mode], MOE_BF16_BOUND)


@pytest.mark.parametrize("mode", ["pair_token", "sorted_experts", "split_k2"])
def test_moe_dense_expert_weights(experts, mode):
    gate_up = experts[0].dequantize(torch.float32)
    down = experts[1].dequantize(torch.float32)
    ids, weights = _routing(5, 2, seed=9)
    x = torch.randn(5, H, device=DEVICE)
    _check(x, ids, weights, gate_up, down, MODES[mode], FP32_BOUND)


def test_moe_default_config_and_errors(experts):
    ids, weights = _routing(4, 2, seed=4)
    x = torch.randn(4, H, device=DEVICE, dtype=torch.bfloat16)
    _check(x, ids, weights, *experts, None, BF16_BOUND)
    assert fused_moe(x[:0], ids[:0], weights[:0], *experts).shape == (0, H)
    with pytest.raises(ValueError, match="features"):
        fused_moe(x[:, :64], ids, weights, *experts)
    with pytest.raises(ValueError, match="both"):
        fused_moe(x, ids, weights, experts[0], experts[1].dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="down_mode"):
        MoEConfig(down_mode="atomic")


def test_heuristic_moe_config_by_batch():
    one = heuristic_moe_config(1, 128, 8, hidden=2816, inter=704, sms=132)
    assert one.split and 1 * 8 * 22 * one.gate_up_split_k >= 2 * 132  # about two waves for one token
    assert heuristic_moe_config(16, 128, 8).block_m == 16
    assert heuristic_moe_config(1800, 128, 8).block_m == 64
    assert heuristic_moe_config(4096, 128, 8).block_m == 128  # prefill-sized expert blocks


@pytest.mark.skipif(not ON_GPU or interpreting(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_moe_replays_in_cuda_graph(experts, mode):
    ids, weights = _routing(9, 2, seed=3)
    x = torch.randn(9, H, device=DEVICE, dtype=torch.bfloat16)
    fused_moe(x, ids, weights, *experts, config=MODES[mode])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, ids, weights, *experts, config=MODES[mode])
    new_ids, new_weights = _routing(9, 2, seed=4)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = TorchBackend().moe(x.float(), ids, weights, *experts)
    assert rel_error(captured, ref) < BF16_BOUND


@pytest.mark.skipif(not ON_GPU or interpreting(), reason="PTX decode runs on a CUDA GPU only")
@pytest.mark.parametrize(
    "mode", ["pair_token", "sorted_experts", "sorted_halves", "split_k3", "split_down2", "split_halves"]
)
def test_moe_asm_decode_matches_bits(experts, mode):
    ids, weights = _routing(12, 3, seed=5)
    x = torch.randn(12, H, device=DEVICE, dtype=torch.bfloat16)
    bits = fused_moe(x, ids, weights, *experts, config=MODES[mode])
    asm = fused_moe(x, ids, weights, *experts, config=MoEConfig(**{**MODES[mode].__dict__, "decode": "asm"}))
    assert torch.equal(bits, asm)


def test_moe_path_by_batch_size_and_card():
    """Without a config: the fragment kernels only for bf16 on SM80+ GPUs and widths of multiples of 32 (per pair
    up to FRAG_TOKENS tokens, grouped up to MOE_GROUPED_TOKENS), grouped GEMMs from `prefill_min_tokens`, else tiles."""
    from nvfp4kit.kernels.moe_dispatch import moe_path
    from nvfp4kit.kernels.moe_prefill import grouped_mm_available
    from nvfp4kit.kernels.path_limits import FRAG_TOKENS, MOE_GROUPED_TOKENS

    gate_up, down = random_experts(4, 2 * 64, 96, seed=3), random_experts(4, 96, 64, seed=4)
    frag_card = ON_GPU and torch.cuda.get_device_capability() >= (8, 0)
    for tokens in sorted({1, FRAG_TOKENS, FRAG_TOKENS + 1, MOE_GROUPED_TOKENS, MOE_GROUPED_TOKENS + 1} - {0}):
        x = torch.randn(tokens, 96, device=DEVICE, dtype=torch.bfloat16)
        path = moe_path(x, 2, gate_up, down, prefill_min_tokens=10**6)
        if frag_card and tokens <= FRAG_TOKENS:
            assert path == "frag"
        elif frag_card and FRAG_TOKENS > 0 and tokens <= MOE_GROUPED_TOKENS:
            assert path == "grouped"
        else:
            assert path == "tiles"
        if not frag_card and grouped_mm_available(x):
            assert moe_path(x, 2, gate_up, down, prefill_min_tokens=1) == "prefill"
    odd = (
        random_experts(4, 2 * 48, 80, seed=5),
        random_experts(4, 80, 48, seed=6),
    )  # H = 80: no fragment kernel
    x = torch.randn(1, 80, device=DEVICE, dtype=torch.bfloat16)
    assert moe_path(x, 2, *odd, prefill_min_tokens=10**6) == "tiles"


def test_moe_path_follows_the_tuned_table(monkeypatch):
    """A table entry naming a path wins over the token limits below the prefill size, where its kernels run;
    NVFP4KIT_FRAG_GEMV=0 (FRAG_TOKENS 0) keeps the fragment kernels off whatever the table says."""
    from nvfp4kit.kernels import moe_dispatch

    gate_up, down = random_experts(4, 2 * 64, 96, seed=3), random_experts(4, 96, 64, seed=4)
    x = torch.randn(3, 96, device=DEVICE, dtype=torch.bfloat16)
    table = {}
    monkeypatch.setattr(
        moe_dispatch, "select_moe_config", lambda tokens, *a, **k: table.get(tokens, MoEConfig())
    )
    monkeypatch.setattr(moe_dispatch, "moe_frag_supported", lambda *a: True)  # as on an SM80+ card
    monkeypatch.setattr(moe_dispatch, "frag_experts_supported", lambda *a: True)
    monkeypatch.setattr(moe_dispatch, "FRAG_TOKENS", 4)
    monkeypatch.setattr(moe_dispatch, "MOE_GROUPED_TOKENS", 32)
    path = functools.partial(moe_dispatch.moe_path, x, 2, gate_up, down, prefill_min_tokens=10**6)
    assert path() == "frag"  # no path in the entry: the limits
    table[3] = MoEConfig(path="tiles")
    assert path() == "tiles"
    table[3] = MoEConfig(path="grouped")
    assert path() == "grouped"
    assert moe_dispatch.moe_path(x, 2, gate_up, down, prefill_min_tokens=2) != "grouped"  # prefill size
    monkeypatch.setattr(moe_dispatch, "FRAG_TOKENS", 0)
    assert path() == "tiles"
    assert path(config=MoEConfig(path="frag")) == "tiles"  # an explicit config, its kernels switched off


def test_a_fragment_config_falls_back_to_the_tiles_where_it_cannot_run(experts):
    """fused_moe with a fragment config on operands its kernels do not take (the CPU, fp32) runs the tiles and
    gives their result, no error."""
    ids, weights = _routing(5, 3, seed=8)
    x = torch.randn(5, H, device=DEVICE, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", RuntimeWarning
        )  # the interpreter's exp overflows for very negative gates
        out = fused_moe(x, ids, weights, *experts, config=MoEConfig(path="frag"))
    assert rel_error(out, TorchBackend().moe(x, ids, weights, *experts)) < FP32_BOUND


@pytest.mark.skipif(
    not ON_GPU or interpreting() or torch.cuda.get_device_capability() < (8, 0),
    reason="the fragment kernels run on SM80+ GPUs only",
)
def test_fragment_configs_run_the_fragment_kernels():
    """A tuned entry's path runs exactly the kernels it names (what `nvfp4kit tune` timed)."""
    from nvfp4kit.kernels.moe_frag import fused_moe_frag
    from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped

    gate_up, down = random_experts(4, 2 * 64, 96, seed=3), random_experts(4, 96, 64, seed=4)
    x = torch.randn(3, 96, device=DEVICE, dtype=torch.bfloat16)
    weights, ids = torch.topk(torch.randn(3, 4, device=DEVICE).softmax(-1), 2)
    frag = fused_moe(x, ids, weights, gate_up, down, config=MoEConfig(path="frag"))
    assert torch.equal(frag, fused_moe_frag(x, ids.reshape(-1), weights.reshape(-1), gate_up, down, top_k=2))
    grouped = fused_moe(x, ids, weights, gate_up, down, config=MoEConfig(path="grouped"))
    assert torch.equal(grouped, fused_moe_grouped(x, ids, weights, gate_up, down))


class _Sorted(Exception):
    """Stops the grouped MoE once it has sorted (its kernels need an SM80+ GPU)."""


@pytest.mark.parametrize("beside", [True, False])
def test_the_grouped_moe_sorts_per_expert_only_when_it_runs_alone(monkeypatch, beside):
    """The per-expert sort's 128 programs slowed the grouped gate_up 40% beside the dense MLP's second stream
    (H100 batch 16, session 35) and sped batch 64 up where the grouped kernels run alone."""
    from nvfp4kit.kernels import moe_frag_grouped
    from nvfp4kit.kernels.path_limits import GROUPED_ALONE_TOKENS

    methods = []

    def record(topk_ids, *, num_experts, block_m, method):
        methods.append(method)
        raise _Sorted

    monkeypatch.setattr(moe_frag_grouped, "moe_align", record)
    tokens = GROUPED_ALONE_TOKENS + (0 if beside else 1)
    gate_up, down = random_experts(4, 2 * 64, 96, seed=3), random_experts(4, 96, 64, seed=4)
    weights, ids = torch.topk(torch.randn(tokens, 4).softmax(-1), 2)
    with pytest.raises(_Sorted):
        moe_frag_grouped.fused_moe_grouped(
            torch.randn(tokens, 96, dtype=torch.bfloat16), ids, weights, gate_up, down
        )
    assert methods == ["triton" if beside else "experts"]


def test_the_dense_mlp_runs_beside_the_moe_unless_grouped_kernels_fill_the_card(monkeypatch):
    """Above GROUPED_ALONE_TOKENS the expert-grouped kernels take every SM: the dense MLP then waits for them
    instead of running on a second stream (slower for both, session 22); every other path leaves room."""
    from nvfp4kit.kernels import moe_dispatch
    from nvfp4kit.kernels.path_limits import GROUPED_ALONE_TOKENS

    gate_up, down = random_experts(4, 2 * 64, 96, seed=3), random_experts(4, 96, 64, seed=4)
    paths = {"now": "grouped"}
    monkeypatch.setattr(moe_dispatch, "moe_path", lambda *a, **k: paths["now"])
    for tokens, shares in (
        (1, True),
        (GROUPED_ALONE_TOKENS, True),
        (GROUPED_ALONE_TOKENS + 1, False),
        (64, False),
    ):
        x = torch.randn(tokens, 96, device=DEVICE, dtype=torch.bfloat16)
        assert moe_dispatch.moe_shares_gpu(x, 2, gate_up, down) is shares, tokens
    paths["now"] = "tiles"
    assert moe_dispatch.moe_shares_gpu(
        torch.randn(64, 96, device=DEVICE, dtype=torch.bfloat16), 2, gate_up, down
    )
