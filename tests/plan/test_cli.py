import json

import pytest

from nvfp4kit.cli import main
from nvfp4kit.testing.tiny import write_tiny_checkpoint


def run(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_on_a_preset_prints_all_sections(capsys):
    code, out, _ = run(capsys, "gemma-4-26b-a4b", "--gpu", "RTX 3090")
    assert code == 0
    for text in ("25.23 B parameters", "3.82 B active", "102,400", "10,240", "5,120", "SGLang 0.91/0.05",
                 "262,144 (model limit)", "Decode roofline (936 GB/s)"):  # fmt: skip
        assert text in out


def test_json_carries_the_same_numbers(capsys):
    args = (
        "gemma-4-26b-a4b",
        "--gpu-memory",
        "24GiB",
        "--bandwidth",
        "936GB",
        "--sglang-weights",
        "17.81GiB",
    )
    _, text, _ = run(capsys, *args)
    code, out, _ = run(capsys, *args, "--json")
    plan = json.loads(out)
    assert code == 0
    assert plan["sglang"]["full_tokens"] == pytest.approx(232_000, rel=0.02)
    assert plan["sglang"]["swa_tokens"] == pytest.approx(11_600, rel=0.02)
    assert f"{plan['nvfp4kit']['requests_at_context']:,}" in text
    assert plan["kv_bytes_per_token"]["fp8_e5m2"]["sliding"] == 102_400
    assert plan["gpu"]["name"] == "custom" and plan["roofline"][0]["batch"] == 1


def test_options_change_the_plan(capsys):
    base = json.loads(run(capsys, "gemma-4-31b", "--gpu", "h100", "--json")[1])
    other = json.loads(
        run(capsys, "gemma-4-31b", "--gpu", "h100", "--json", "--kv-dtype", "bf16", "--recipe", "attention-bf16",
            "--context", "8192", "--concurrency", "4", "--k-and-v")[1]
    )  # fmt: skip
    assert other["weights"]["engine_bytes"] > base["weights"]["engine_bytes"]
    assert other["nvfp4kit"]["global_bytes_per_token"] == 4 * base["nvfp4kit"]["global_bytes_per_token"]
    assert other["nvfp4kit"]["context"] == 8192 and other["roofline"][-1]["batch"] == 4


def test_plan_on_a_checkpoint_folder_sizes_it_from_its_headers(tmp_path, capsys):
    folder = write_tiny_checkpoint(tmp_path / "tiny", shape="moe", multimodal=True)
    code, out, _ = run(capsys, str(folder), "--gpu", "l4", "--json")
    plan = json.loads(out)
    assert code == 0
    assert plan["model"]["source"] == "checkpoint" and plan["weights"]["source"] == "checkpoint headers"
    size = (folder / "model.safetensors").stat().st_size
    assert 0 < plan["weights"]["checkpoint_bytes"] < size  # the header itself is not weights
    code, out, _ = run(capsys, str(folder))
    assert code == 0 and "as stored" in out


def test_without_bandwidth_there_is_no_roofline(capsys):
    _, out, _ = run(capsys, "gemma-4-e4b", "--gpu-memory", "16GiB")
    assert "pass --gpu or --bandwidth" in out


def test_bad_model_and_bad_sizes_are_clear_errors(tmp_path, capsys):
    code, _, err = run(capsys, "gemma-9")
    assert code == 1 and "gemma-4-26b-a4b" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, str(tmp_path / "empty"))
    assert code == 1 and "config.json" in err
    with pytest.raises(SystemExit):
        main(["plan", "gemma-4-31b", "--gpu-memory", "lots"])
    assert "24GiB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "gemma-4-31b", "--mem-fraction-static", "1.5"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    for option in ("--gpu", "--gpu-memory", "--kv-dtype", "--context", "--concurrency", "--recipe",
                   "--mem-fraction-static", "--swa-full-tokens-ratio", "--json", "gemma-4-e2b", "RTX 3090"):  # fmt: skip
        assert option in out
