"""The batched sampler against the per-row rules: masks, penalties, seeds, logprobs, the greedy fallback."""

import math

import torch

from nvfp4kit.engine.batch_sampler import SampleRow, apply_penalties_batch, sample_batch
from nvfp4kit.sampling import SamplingParams, apply_penalties, filter_logits, make_generator


def row(prompt=(), output=(), seed=None, **params):
    return SampleRow(SamplingParams(**params), list(prompt), list(output), make_generator(seed))


def test_penalties_match_the_per_row_rule():
    logits = torch.randn(3, 50)
    rows = [
        row(
            prompt=[1, 2, 3],
            output=[3, 4, 4],
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.2,
        ),
        row(output=[7, 7, 7], frequency_penalty=1.0),
        row(prompt=[9], temperature=1.0),
    ]
    got = apply_penalties_batch(logits.clone(), rows)
    for i, r in enumerate(rows):
        ref = apply_penalties(logits[i].clone(), r.params, r.prompt_ids, r.output_ids)
        torch.testing.assert_close(got[i], ref)


def test_only_tokens_the_filters_keep_are_sampled():
    torch.manual_seed(1)
    logits = torch.randn(64, 40) * 3
    rows = [row(temperature=1.0, top_k=3) for _ in range(32)] + [
        row(temperature=0.7, top_p=0.5) for _ in range(32)
    ]
    for _ in range(5):
        for i, result in enumerate(sample_batch(logits, rows)):
            allowed = torch.isfinite(filter_logits(logits[i].clone(), rows[i].params))
            assert allowed[result.token_id], (i, result.token_id)


def test_frequencies_follow_the_distribution():
    torch.manual_seed(2)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 20000
    rows = [row(temperature=1.0, min_p=0.05) for _ in range(draws)]
    tokens = torch.tensor([r.token_id for r in sample_batch(logits.expand(draws, -1), rows)])
    probs = torch.softmax(filter_logits(logits.clone(), rows[0].params), dim=-1)
    freq = torch.bincount(tokens, minlength=6).float() / draws
    assert freq[5] == 0  # below min_p * max: never drawn
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / draws)


def test_a_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(4, 300)
    for seed in range(6):
        alone = sample_batch(logits[:1], [row(seed=seed, temperature=1.0, top_k=20)])[0].token_id
        # the others widen the candidate set (top_k 200, none) and draw from the global generator
        crowd = [
            row(seed=seed, temperature=1.0, top_k=20),
            row(temperature=1.0),
            row(temperature=1.0, top_k=200),
        ]
        assert sample_batch(logits[:3], crowd)[0].token_id == alone
    seeds = {sample_batch(logits[:1], [row(seed=s, temperature=1.0)])[0].token_id for s in range(12)}
    assert len(seeds) > 1


def test_greedy_rows_logprobs_and_fallback():
    logits = torch.randn(3, 30)
    logits[2] = float("nan")  # a broken row falls back to greedy over -inf: a token, no crash
    rows = [
        row(temperature=0.0, logprobs=3),
        row(temperature=1e-5 * 1.01, top_k=1, logprobs=0),
        row(temperature=1.0),
    ]
    results = sample_batch(logits, rows)
    raw = torch.log_softmax(logits[:2], dim=-1)
    assert results[0].token_id == int(logits[0].argmax())
    assert results[1].token_id == int(logits[1].argmax())  # top_k=1
    assert math.isclose(results[0].logprob, float(raw[0].max()), rel_tol=1e-6)
    assert [t for t, _ in results[0].top_logprobs] == raw[0].topk(3).indices.tolist()
    assert results[1].top_logprobs == []
    assert 0 <= results[2].token_id < 30
