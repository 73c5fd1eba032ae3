"""`nvfp4kit bench attention` end to end on the CPU (interpreted kernels, a tiny checkpoint's shapes): the rows
it reports, and the prefill kernel agreeing with the paged kernel on every timed chunk."""

from __future__ import annotations

import json

from nvfp4kit.cli import main


def test_bench_attention_reports_both_kernels_per_layer_kind(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("moe")
    out = tmp_path / "attention.json"
    code = main(["bench", "attention", "--device", "cpu", "--preset", str(folder), "--prompts", "40",
                 "--chunk", "16", "--json", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layer"], r["kernel"]) for r in rows} == {
        (kind, kernel) for kind in ("sliding", "global") for kernel in ("paged", "prefill")
    }
    for r in rows:
        assert r["ms"] > 0
        if r["kernel"] == "prefill":
            assert r["rel_err_vs_paged"] < 1e-4  # fp32 in the interpreter: the same math in another order
