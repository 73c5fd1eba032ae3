"""The kernel benchmark's CPU-checkable parts: cases, byte/FLOP counts, rows, table, candidates, CLI."""

import argparse
import warnings

import pytest
import torch

from nvfp4kit.bench import register_all
from nvfp4kit.bench.report import format_table, row_for
from nvfp4kit.kernels.configs import LinearConfig, MoEConfig
from nvfp4kit.tuning import cases
from nvfp4kit.tuning.search import linear_candidates, moe_candidates
from nvfp4kit.tuning.timing import Timing, rotation_sets

from .helpers import DEVICE

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU


def test_random_nvfp4_is_a_valid_weight():
    w = cases.random_nvfp4(32, 64, experts=3, device="cpu")
    assert w.packed.shape == (3, 32, 32) and w.scale.shape == (3, 32, 4) and w.scale_2.shape == (3,)
    assert torch.isfinite(w.dequantize()).all()
    assert cases.nvfp4_bytes(w) == 3 * (32 * 32 + 32 * 4 + 4)


def test_dense_case_counts_and_correctness_check():
    case = cases.DenseCase.build("dense_down", 48, 96, 3, sets=2, bf16_sets=1, device=DEVICE)
    config = LinearConfig("dot", 16, 16, 32)
    assert case.error(config) < 1e-2
    assert case.flops == 2 * 3 * 48 * 96
    assert case.bytes == 48 * 48 + 48 * 6 + 4 + 2 * 3 * (96 + 48)
    assert case.bf16_call()(1).shape == (3, 48)


def test_moe_case_on_a_small_shape(monkeypatch):
    monkeypatch.setattr(cases, "MOE_SHAPE", {"experts": 4, "top_k": 2, "hidden": 64, "inter": 32})
    case = cases.MoECase.build(3, weight_sets=1, route_sets=2, device=DEVICE)
    config = MoEConfig(sorted=False, gate_up_block_n=16, gate_up_block_k=32, down_block_n=16, down_block_k=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert case.error(config) < 2e-2
        baseline = case.bf16_call()(0)
    assert baseline.shape == (3, 64)
    assert 1 <= case.distinct_experts() <= 4
    assert case.flops == 2 * 3 * 2 * 3 * 32 * 64


def test_row_and_table():
    case = cases.DenseCase.build("dense_down", 32, 64, 1, sets=1, bf16_sets=1, device=DEVICE)
    row = row_for("dense_down", "32x64", 1, Timing(2.0, 9.0), Timing(4.0, 10.0), case, 1000.0, 1e-3, None)
    assert row["us"] == 2.0 and row["bf16_us"] == 4.0 and row["config"] is None
    assert row["gbps"] == pytest.approx(case.bytes / 2.0 / 1e3, abs=0.05)
    assert row["pct_copy_bw"] == pytest.approx(100 * case.bytes / 2.0 / 1e3 / 1000.0, abs=0.05)
    table = format_table([row])
    assert "dense_down" in table and len(table.splitlines()) == 2
    assert format_table([dict(row, path="frag")], header=False).split()[-1] == "frag"  # which kernels ran


def test_rotation_covers_l2():
    assert rotation_sets(10 << 20, l2_bytes=50 << 20) == 20
    assert rotation_sets(1 << 30, l2_bytes=50 << 20) == 1
    assert rotation_sets(1, l2_bytes=50 << 20, cap=8) == 8


@pytest.mark.parametrize("m", [1, 2, 4, 16, 64, 512, 4096])
def test_candidates_are_valid(m):
    linear = linear_candidates(m, 8192, 2816, sms=132)
    assert linear and all(c.kernel == "dot" or m <= c.block_m for c in linear)
    assert {c.decode for c in linear} == {"asm"}
    moe = moe_candidates(m, 128, 8)
    assert moe and (m > 8 or any(not c.sorted for c in moe))
    # few tokens: the split kernels are tried with a shallower pipeline too (more programs fit an SM)
    assert m > 16 or {c.num_stages for c in moe if c.split} == {2, 3}
    # ... and with the down projection's K split among programs
    assert m > 16 or {c.down_split_k for c in moe if c.split} == {1, 2, 3}


@pytest.mark.parametrize("m", [1, 8, 9, 64, 128, 129])
def test_moe_candidates_name_their_path(m):
    """With `frag` the per-pair fragment MoE is a candidate up to 8 tokens and the expert-grouped one from 2 to
    128, and every tiles candidate names its path (a table entry then overrides the token limits); without it
    none names a path, so a table tuned with the fragment kernels off leaves the limits to choose."""
    plain = moe_candidates(m, 128, 8)
    assert {c.path for c in plain} == {None}
    paths = [c.path for c in moe_candidates(m, 128, 8, frag=True)]
    assert set(paths) - {"frag", "grouped"} == {"tiles"}
    assert paths.count("frag") == (m <= 8) and paths.count("grouped") == (2 <= m <= 128)
    assert len(paths) == len(plain) + (m <= 8) + (2 <= m <= 128)


def test_moe_case_runs_only_the_paths_its_operands_take(monkeypatch):
    """The tuner skips a fragment candidate whose kernels would fall back to the tiles (CPU, or unsupported
    widths): it would time the fallback under the fragment's name."""
    monkeypatch.setattr(cases, "MOE_SHAPE", {"experts": 4, "top_k": 2, "hidden": 64, "inter": 32})
    case = cases.MoECase.build(3, weight_sets=1, route_sets=1, device=DEVICE)
    assert case.runs(MoEConfig(path="tiles")) and case.runs(MoEConfig())
    on_fragment_card = torch.device(DEVICE).type == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    assert case.runs(MoEConfig(path="grouped")) == on_fragment_card
    assert case.runs(MoEConfig(path="frag")) == on_fragment_card
    with pytest.raises(ValueError, match="path"):
        MoEConfig(path="fast")


def test_bench_cli_has_the_kernels_scenario():
    parser = argparse.ArgumentParser()
    register_all(parser.add_subparsers(dest="scenario"))
    args = parser.parse_args(["kernels", "--ops", "moe", "--m", "1", "16", "--tune"])
    assert args.ops == ["moe"] and args.m == [1, 16] and args.tune and callable(args.func)
