import json

import pytest

from nvfp4kit.cli import main
from nvfp4kit.eval import EvalError, compare_checkpoints, compare_models, load_samples
from nvfp4kit.model.loader import load_model
from nvfp4kit.tokenizer import Tokenizer


def _samples(folder, data, n=4, seq_len=40):
    return load_samples([data], Tokenizer(folder), num_samples=n, seq_len=seq_len)


def test_a_checkpoint_against_itself_is_perfect(eval_pair, eval_text):
    ref, _ = eval_pair
    report = compare_checkpoints(ref, ref, _samples(ref, eval_text))
    a = report.agreement
    assert a.kl_mean == 0.0 and a.kl_max == 0.0 and a.top1_agreement == 1.0
    assert a.ppl_ref == a.ppl_quant and a.num_tokens == sum(len(s) - 1 for s in _samples(ref, eval_text))


def test_quantized_export_differs_and_low_memory_gives_the_same_numbers(eval_pair, eval_text):
    ref, quant = eval_pair
    samples = _samples(ref, eval_text)
    together = compare_checkpoints(ref, quant, samples)
    one_at_a_time = compare_checkpoints(ref, quant, samples, low_memory=True)
    assert together.agreement.kl_mean > 0.0
    assert together.agreement == one_at_a_time.agreement
    assert together.quant_bytes < together.ref_bytes
    d = together.to_dict()
    assert {"kl_mean", "kl_p99", "top1_agreement", "ppl_ref", "ppl_quant", "ref_bytes", "quant_bytes"} <= set(
        d
    )


def test_vocabulary_mismatch_is_refused(eval_pair, tiny_checkpoint, eval_text):
    ref, _ = eval_pair
    other = tiny_checkpoint("moe", vocab_size=400, vocab_size_per_layer_input=400)
    with pytest.raises(EvalError, match="vocabularies differ"):
        compare_models(load_model(ref), load_model(other), _samples(ref, eval_text))


def test_cli_prints_and_writes_json(eval_pair, eval_text, tmp_path, capsys):
    ref, quant = eval_pair
    out = tmp_path / "result.json"
    rc = main(["eval", str(ref), str(quant), "--data", str(eval_text), "--num-samples", "3", "--seq-len", "32",
               "--json", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "KL mean" in printed and "top-1 agreement" in printed
    result = json.loads(out.read_text())
    assert result["num_sequences"] == 3 and result["kl_mean"] > 0 and result["quant"] == str(quant)


def test_cli_needs_both_checkpoints_or_neither(eval_pair, capsys):
    ref, _ = eval_pair
    assert main(["eval", str(ref)]) == 2
    assert "both REF and QUANT" in capsys.readouterr().err
