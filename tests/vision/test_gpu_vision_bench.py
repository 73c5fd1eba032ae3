"""scripts/gpu_vision_bench.py on the CPU with the tiny tower: it runs, checks BF16 against fp32 and writes JSON."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_vision_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_vision_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_the_table_and_writes_json(tmp_path, capsys):
    bench = load_script()
    result = bench.main(
        ["--device", "cpu", "--tiny", "--repeats", "1", "--batch", "2", "--out", str(tmp_path)]
    )
    assert json.loads((tmp_path / "vision_bench.json").read_text()) == result
    rows = result["rows"]
    assert [(r["soft_tokens"], r["batch"]) for r in rows] == [(140, 1), (70, 1), (70, 2)]
    assert [r["patches_per_image"] for r in rows] == [140 * 9, 70 * 9, 70 * 9]
    for row in rows:
        assert 0 < row["rel_error_vs_fp32"] < 0.1  # BF16 soft tokens near the fp32 reference, not equal to it
        assert row["ms"] > 0 and row["peak_bytes"] is None and row["planned_bytes"] > 0
    assert rows[2]["planned_bytes"] == 2 * rows[1]["planned_bytes"]
    assert "rel err" in capsys.readouterr().out


def test_the_26b_tower_shape_matches_the_preset():
    bench = load_script()
    vision, text_hidden = bench.tower_shape(tiny=False)
    assert (vision["hidden_size"], vision["num_hidden_layers"], text_hidden) == (1152, 27, 2816)
    patches, positions = bench.grid_image(1120, vision, __import__("torch").Generator().manual_seed(0))
    assert (
        patches.shape == (1120 * 9, 3 * 16 * 16) and int(positions.max()) < vision["position_embedding_size"]
    )
