"""Dense W4A16 linear against fp32 math on the dequantized weight, on awkward shapes and every kernel path."""

import pytest
import torch

from nvfp4kit.kernels.configs import LinearConfig, heuristic_linear_config, interpreting
from nvfp4kit.kernels.w4a16_linear import w4a16_linear

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, ON_GPU, random_weight, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU

SHAPES = [(40, 80), (24, 208)]  # (N, K): N not a power of two, K a multiple of 16 only
CONFIGS = {
    "gemv": LinearConfig("gemv", block_m=4, block_n=16, block_k=64),
    "gemv_split": LinearConfig("gemv", block_m=4, block_n=32, block_k=32, split_k=3),
    "gemv_halves": LinearConfig("gemv", block_m=4, block_n=8, block_k=64, split_k=2, halves=True),
    # whole rows: one K tile wider than K (masked), as the batch-1 candidates launch it
    "gemv_rows": LinearConfig("gemv", block_m=4, block_n=4, block_k=256, halves=True),
    "dot": LinearConfig("dot", block_m=16, block_n=16, block_k=64),
    "dot_split": LinearConfig("dot", block_m=16, block_n=32, block_k=32, split_k=2),
    "dot_swap": LinearConfig("dot", block_m=16, block_n=16, block_k=32, swap_ab=True, group_m=2),
    "dot_wide": LinearConfig("dot", block_m=32, block_n=32, block_k=128, group_m=1),
    # nibble halves: even and odd K columns as two MMAs (a ragged last K tile: 208 = 6.5 x 32 in the asm test)
    "dot_halves": LinearConfig("dot", block_m=16, block_n=32, block_k=32, split_k=2, halves=True),
    "dot_swap_halves": LinearConfig("dot", block_m=16, block_n=16, block_k=64, swap_ab=True, halves=True),
}


def _reference(x, weight):
    return x.float() @ weight.dequantize(torch.float32).T


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
def test_linear_paths_match_reference(name, m):
    config = CONFIGS[name]
    if config.kernel == "gemv" and m > config.block_m:
        pytest.skip("gemv handles M <= block_m")
    n, k = SHAPES[m % 2]
    weight = random_weight(n, k, seed=m)
    x32 = torch.randn(m, k, device=DEVICE)
    assert rel_error(w4a16_linear(x32, weight, config=config), _reference(x32, weight)) < FP32_BOUND
    x16 = x32.bfloat16()
    y = w4a16_linear(x16, weight, config=config)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_error(y, _reference(x16, weight)) < BF16_BOUND


@pytest.mark.parametrize("m", [1, 5, 40])
def test_default_config_and_leading_dims(m):
    weight = random_weight(48, 96, seed=7)
    x = torch.randn(2, m, 96, device=DEVICE, dtype=torch.float16)
    y = w4a16_linear(x, weight)
    assert y.shape == (2, m, 48) and y.dtype == torch.float16
    assert rel_error(y, _reference(x, weight)) < BF16_BOUND


def test_empty_batch_and_bad_inputs():
    weight = random_weight(32, 64, seed=1)
    assert w4a16_linear(torch.empty(0, 64, device=DEVICE), weight).shape == (0, 32)
    with pytest.raises(ValueError, match="features"):
        w4a16_linear(torch.randn(2, 48, device=DEVICE), weight)
    with pytest.raises(ValueError, match="activations"):
        w4a16_linear(torch.ones(2, 64, dtype=torch.int32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="gemv"):
        w4a16_linear(torch.randn(3, 64, device=DEVICE), weight, config=LinearConfig("gemv", block_m=2))


def test_config_validation_and_heuristic_covers_every_m():
    with pytest.raises(ValueError, match="kernel"):
        LinearConfig("mma")
    with pytest.raises(ValueError, match="block_k"):
        LinearConfig(block_k=48)
    for m in (1, 3, 16, 17, 64, 100, 256, 4096, 16384):
        cfg = heuristic_linear_config(m, 8192, 2816, sms=132)
        assert cfg.kernel == "dot" and cfg.block_m >= min(m, 16)


@pytest.mark.skipif(not ON_GPU or interpreting(), reason="PTX decode runs on a CUDA GPU only")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_asm_decode_matches_bits_decode_bitwise(name):
    config = CONFIGS[name]
    m = 3 if config.kernel == "gemv" else 33
    weight = random_weight(72, 208, seed=3)
    x = torch.randn(m, 208, device=DEVICE, dtype=torch.bfloat16)
    bits = w4a16_linear(x, weight, config=config)
    asm = w4a16_linear(x, weight, config=LinearConfig(**{**config.__dict__, "decode": "asm"}))
    assert torch.equal(bits, asm)


@pytest.mark.skipif(not ON_GPU or interpreting(), reason="CUDA graphs need a GPU")
def test_linear_replays_in_cuda_graph():
    weight = random_weight(96, 160, seed=5)
    x = torch.randn(7, 160, device=DEVICE, dtype=torch.bfloat16)
    config = LinearConfig("dot", block_m=16, block_n=32, block_k=32, split_k=2)
    eager = w4a16_linear(x, weight, config=config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4a16_linear(x, weight, config=config)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, w4a16_linear(x, weight, config=config))
    assert not torch.equal(captured, eager)


def test_tuned_tables_parse_and_cover_every_m():
    from nvfp4kit.kernels import configs

    tables = sorted(configs.TUNED_DIR.glob("*.json"))
    assert tables, "no tuned table shipped"
    for path in tables:
        table = configs._read_table(path)
        for entries in table["linear"].values():
            for m in (1, 3, 9, 100, 700, 20000):
                entry = configs._pick_bucket(entries, m)
                if m > 2 * max(map(int, entries)):
                    assert entry is None  # far past the tuned sizes: the heuristic
                    continue
                cfg = configs._from_dict(LinearConfig, entry)
                assert cfg.kernel == "dot" or m <= cfg.block_m or m > max(map(int, entries))
        for entries in table["moe"].values():
            for m in (1, 5, 64):
                configs._from_dict(configs.MoEConfig, configs._pick_bucket(entries, m))


def test_the_users_tuning_cache_wins_per_shape(tmp_path, monkeypatch):
    """`nvfp4kit tune` results (per card and Triton version) replace the shipped table shape by shape."""
    import json

    from nvfp4kit.kernels import configs

    monkeypatch.setenv("NVFP4KIT_CACHE_DIR", str(tmp_path))
    configs.forget_tables()
    shipped = configs.tables_for("nvidia-h100-80gb-hbm3", "9.9")
    shape, entries = next(iter(shipped["linear"].items()))
    mine = {"linear": {shape: {"1": {"kernel": "gemv", "block_m": 1, "block_n": 4, "block_k": 512}}}}
    path = configs.cache_path("nvidia-h100-80gb-hbm3", "9.9")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(mine))
    configs.forget_tables()
    merged = configs.tables_for("nvidia-h100-80gb-hbm3", "9.9")
    assert merged["linear"][shape] == {**entries, **mine["linear"][shape]}  # per M: the cache's entry wins
    assert merged["moe"] == shipped["moe"]  # shapes the cache lacks still come from the shipped table
    assert configs.tables_for("nvidia-h100-80gb-hbm3", "3.6")["linear"][shape] == entries  # another Triton
    configs.forget_tables()


@pytest.mark.parametrize("m", [1, 2, 5, 40])
def test_heuristic_configs_compute_the_product(m):
    """Whatever the heuristic picks for a card (here 4 SMs: narrow N streams on the CUDA cores at M <= 2)."""
    weight = random_weight(72, 208, seed=m)
    cfg = heuristic_linear_config(m, 72, 208, sms=4)
    assert (cfg.kernel == "gemv") == (m <= 2)
    x = torch.randn(m, 208, device=DEVICE)
    ref = x.double() @ weight.dequantize(torch.float64).T
    assert rel_error(w4a16_linear(x, weight, config=cfg), ref) < FP32_BOUND


@pytest.mark.parametrize("m", [1, 31, 32, 40])  # the threshold pinned at 32: small tensors
def test_kept_bf16_copy_serves_steps_of_many_tokens(m, monkeypatch):
    """A weight with a kept BF16 copy (`--linear-copies`) is read through cuBLAS from LINEAR_COPY_MIN_M tokens
    on and left to the W4A16 kernels below it (they win there); a stand-in copy shows which path ran."""
    from nvfp4kit.kernels import thresholds

    monkeypatch.setattr(thresholds, "LINEAR_COPY_MIN_M", 32)
    weight = random_weight(48, 96, seed=3)
    x = torch.randn(m, 96, device=DEVICE, dtype=torch.bfloat16)
    expected = _reference(x, weight)
    weight.__dict__["_dense"] = weight.dequantize(torch.bfloat16)
    assert rel_error(w4a16_linear(x, weight), expected) < BF16_BOUND
    weight.__dict__["_dense"] = torch.zeros(48, 96, device=DEVICE, dtype=torch.bfloat16)
    copy_read = bool((w4a16_linear(x, weight) == 0).all())
    assert copy_read == (m >= 32)
    assert (
        rel_error(w4a16_linear(x, weight, config=CONFIGS["dot"]), expected) < BF16_BOUND
    )  # a config: Triton
