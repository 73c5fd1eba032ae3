"""`nvfp4kit tune`'s CPU-side parts: shapes read off the model definition, the cache file, clear errors."""

import json

import pytest

from nvfp4kit.cli import main
from nvfp4kit.config import load_preset
from nvfp4kit.tuning.autotune import model_shapes, tune_model, write_cache
from nvfp4kit.tuning.cases import DENSE_SHAPES, MOE_SHAPE


def test_26b_shapes_are_the_benchmarked_ones():
    shapes = model_shapes(load_preset("gemma-4-26b-a4b"))
    assert set(shapes.linear) == set(DENSE_SHAPES.values())  # routers stay BF16: not tuned
    assert shapes.moe == MOE_SHAPE
    assert model_shapes(load_preset("gemma-4-31b")).moe is None


def test_cache_writes_merge_per_m(tmp_path):
    path = tmp_path / "card" / "triton-x.json"
    write_cache(path, {"linear": {"8x16": {"1": {"block_n": 8}}}})
    write_cache(path, {"linear": {"8x16": {"16": {"block_n": 32}}}, "moe": {"a": {"1": {}}}})
    assert json.loads(path.read_text()) == {
        "linear": {"8x16": {"1": {"block_n": 8}, "16": {"block_n": 32}}},
        "moe": {"a": {"1": {}}},
    }


def test_tuning_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        tune_model(load_preset("gemma-4-e2b"))
    assert main(["tune", "gemma-4-e2b"]) == 1
    assert "CUDA GPU" in capsys.readouterr().err


def test_tune_takes_a_kernel_choice(monkeypatch, capsys):
    """`--kernels moe` parses (and still needs a GPU); a kernel family that does not exist is a usage error."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["tune", "gemma-4-e2b", "--kernels", "moe"]) == 1
    assert "CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "gemma-4-e2b", "--kernels", "attention"])
    assert exit_info.value.code == 2
