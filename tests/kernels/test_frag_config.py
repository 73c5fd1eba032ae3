"""How the fragment GEMV (kernels/gemv_mma.py) is chosen: the token limits users set (NVFP4KIT_FRAG_GEMV,
NVFP4KIT_MOE_GROUPED_TOKENS), and the warp count rule that stood in for tuning on the H100 (within 1.09x of the
best of 8 configs at 1-16 tokens)."""

import pytest

from nvfp4kit.kernels import configs, path_limits
from nvfp4kit.tuning.cases import DENSE_SHAPES


@pytest.mark.parametrize("raw,tokens", [("0", 0), ("off", 0), ("4", 4), (" 16 ", 16), ("1", 1)])
def test_token_limit_from_the_environment(raw, tokens):
    assert path_limits.token_limit("NVFP4KIT_FRAG_GEMV", raw, 16) == tokens


@pytest.mark.parametrize("raw", ["17", "on", "-1", "auto"])
def test_a_bad_token_limit_is_refused_with_the_variable_named(raw):
    with pytest.raises(ValueError, match="NVFP4KIT_FRAG_GEMV"):
        path_limits.token_limit("NVFP4KIT_FRAG_GEMV", raw, 16)


# the fastest k_warps of the H100 probe (session 19, scripts/gpu_gemv_mma_probe.py) at one token
H100_BEST_WARPS = {
    "dense_qkv_sliding": 4,
    "dense_qk_global": 4,
    "dense_o_sliding": 8,
    "dense_o_global": 8,
    "dense_gate_up": 8,
    "dense_down": 8,
}


@pytest.mark.parametrize("op", sorted(H100_BEST_WARPS))
def test_warp_rule_matches_the_h100_probe(op):
    n, k = DENSE_SHAPES[op]
    cfg = configs.frag_linear_config(1, n, k, sms=132)
    assert cfg.kernel == "frag" and cfg.num_warps == H100_BEST_WARPS[op]


def test_short_rows_keep_two_k_steps_a_warp():
    # K = 1,024: 8 steps of 128 weights, two for each of 4 warps (8 warps would leave one each)
    assert configs.frag_linear_config(1, 64, 1024, sms=132).num_warps == 4
    assert configs.frag_linear_config(1, 64, 32, sms=132).num_warps == 1


def test_cpu_never_takes_the_fragment_kernel():
    assert configs.select_linear_config(1, 2816, 2112).kernel != "frag"


def test_fragment_kernels_take_only_the_row_layout_they_assume():
    """The fragment kernels round a row's word stride to a multiple of 4 and load a step's two scale bytes as one
    16-bit value: weights whose rows break that (a column slice, a scale view at an odd byte) must go to the
    tiles, not be read at wrong addresses."""
    from nvfp4kit.formats.nvfp4 import NVFP4Tensor
    from nvfp4kit.kernels.gemv_mma import fragment_layout_ok
    from nvfp4kit.tuning.cases import random_nvfp4

    w = random_nvfp4(16, 2112, device="cpu")  # 2,112 / 2 = 1,056-byte rows: 16-byte multiples
    experts = random_nvfp4(32, 704, experts=4, device="cpu")
    assert fragment_layout_ok(w) and fragment_layout_ok(experts)
    wide = random_nvfp4(16, 2112 + 16, device="cpu")  # rows of 1,064 packed bytes and 133 scale bytes
    assert not fragment_layout_ok(NVFP4Tensor(wide.packed[:, :1056], w.scale, w.scale_2))
    assert not fragment_layout_ok(NVFP4Tensor(w.packed, wide.scale[:, :132], w.scale_2))
    odd = NVFP4Tensor(w.packed, wide.scale.view(-1)[1 : 1 + 16 * 132].view(16, 132), w.scale_2)
    assert odd.scale.data_ptr() % 2 == 1 and not fragment_layout_ok(odd)
