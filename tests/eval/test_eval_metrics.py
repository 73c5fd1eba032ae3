import math

import pytest
import torch

from nvfp4kit.eval.metrics import AgreementAccumulator, token_stats


def test_identical_logits_agree_perfectly():
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (9,))
    stats = token_stats(logits, logits.clone(), tokens)
    assert stats.kl.shape == (8,) and float(stats.kl.max()) == 0.0
    assert bool(stats.top1_agree.all())
    assert torch.equal(stats.nll_ref, stats.nll_quant)


def test_kl_nll_and_top1_match_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    ref, quant = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
    tokens = torch.randint(0, 7, (6,), generator=gen)
    stats = token_stats(ref, quant, tokens)
    for t in range(5):
        p, q = torch.softmax(ref[t].double(), -1), torch.softmax(quant[t].double(), -1)
        assert float(stats.kl[t]) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5, abs=1e-7)
        assert float(stats.nll_ref[t]) == pytest.approx(-math.log(float(p[tokens[t + 1]])), rel=1e-5)
        assert float(stats.nll_quant[t]) == pytest.approx(-math.log(float(q[tokens[t + 1]])), rel=1e-5)
        assert bool(stats.top1_agree[t]) == (int(p.argmax()) == int(q.argmax()))


def test_accumulator_summarises_over_all_tokens():
    acc = AgreementAccumulator()
    gen = torch.Generator().manual_seed(2)
    for n in (5, 12):
        ref = torch.randn(n, 11, generator=gen)
        acc.add(token_stats(ref, ref + 0.3 * torch.randn(n, 11, generator=gen), torch.randint(0, 11, (n,))))
    result = acc.result()
    kl = torch.cat([p.kl for p in acc.parts]).double()
    assert result.num_sequences == 2 and result.num_tokens == 4 + 11
    assert result.kl_mean == pytest.approx(float(kl.mean()))
    assert result.kl_median <= result.kl_p99 <= result.kl_max == pytest.approx(float(kl.max()))
    nll = torch.cat([p.nll_ref for p in acc.parts]).double().mean()
    assert result.ppl_ref == pytest.approx(math.exp(float(nll)))
    assert 0.0 <= result.top1_agreement <= 1.0


def test_shape_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        token_stats(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no sequences"):
        AgreementAccumulator().result()
