"""Where the tuning tables live: `tune --cache-dir` and `LLM(kernel_cache_dir=)` before $NVFP4KIT_CACHE_DIR."""

from pathlib import Path

import pytest

from nvfp4kit.cli import main
from nvfp4kit.kernels import configs


@pytest.fixture
def restored():
    yield
    configs.set_cache_dir(None)


def test_the_given_folder_wins_over_the_variable_until_reset(tmp_path, monkeypatch, restored):
    monkeypatch.setenv("NVFP4KIT_CACHE_DIR", str(tmp_path / "from-env"))
    assert configs.cache_dir() == tmp_path / "from-env"
    configs.set_cache_dir(tmp_path / "given")
    assert configs.cache_path("card", "3.6") == tmp_path / "given" / "card" / "triton-3.6.json"
    configs.set_cache_dir(None)
    assert configs.cache_dir() == tmp_path / "from-env"
    monkeypatch.delenv("NVFP4KIT_CACHE_DIR")
    assert configs.cache_dir() == Path.home() / ".cache" / "nvfp4kit" / "kernels"


def test_tune_cache_dir_sets_the_folder(tmp_path, monkeypatch, capsys, restored):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # stops after the folder is set
    assert main(["tune", "gemma-4-e2b", "--cache-dir", str(tmp_path)]) == 1
    assert "CUDA GPU" in capsys.readouterr().err
    assert configs.cache_dir() == tmp_path


def test_llm_kernel_cache_dir_sets_the_folder(tiny_checkpoint, tmp_path, restored):
    from nvfp4kit import LLM

    with LLM(tiny_checkpoint("dense"), kernel_cache_dir=tmp_path):
        assert configs.cache_dir() == tmp_path
