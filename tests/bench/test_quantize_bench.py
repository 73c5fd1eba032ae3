"""`nvfp4kit bench quantize` on toy widths of the 26B-A4B structure, on the CPU."""

import json

import pytest

from nvfp4kit.cli import main


def test_bench_quantize_reports_each_method_per_layer(tmp_path):
    out = tmp_path / "quantize.json"
    args = ["bench", "quantize", "--small", "--device", "cpu", "--layers", "1", "2", "--methods", "max", "gptq",
            "--num-samples", "2", "--seq-len", "16", "--work", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["small"] and result["num_samples"] == 2
    rows = {(r["layers"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(1, "max"), (1, "gptq"), (2, "max"), (2, "gptq")}
    for (layers, _), row in rows.items():
        assert "error" not in row, row
        assert row["seconds"] > 0 and row["peak_rss_gib"] > 0
        assert row["seconds_per_layer"] == pytest.approx(row["seconds"] / layers, abs=0.01)
    assert {"solve", "stats forwards", "write"} <= set(rows[(2, "gptq")]["stages"])
    ckpt = (
        tmp_path / "work" / "ckpt2"
    )  # the random checkpoint is kept with --work: one sliding + one global layer
    config = json.loads((ckpt / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert not list((tmp_path / "work").glob("out-*"))  # exports are removed after each run


def test_bench_quantize_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quantize", "--methods", "awq"])
    assert "invalid choice" in capsys.readouterr().err
