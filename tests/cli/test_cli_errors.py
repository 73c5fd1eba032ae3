"""Mistakes a new user makes get one clear line, not a traceback (issue 19, item 6)."""

import pytest
import torch

from nvfp4kit.cli import main


def test_short_preset_names_are_accepted(capsys):
    assert main(["plan", "e2b"]) == 0
    assert capsys.readouterr().out.startswith("gemma-4-e2b (preset)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and "Traceback" not in err


def test_a_missing_model_folder_is_named(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert "no such model folder" in capsys.readouterr().err


def test_roofline_columns_stay_apart_on_a_tiny_checkpoint(tiny_checkpoint, capsys):
    assert main(["plan", str(tiny_checkpoint("moe")), "--gpu", "rtx3090"]) == 0
    out = capsys.readouterr().out
    rows = out.split("Decode roofline", 1)[1].splitlines()[2:4]
    assert rows and all(len(row.split()) == 7 for row in rows), rows
