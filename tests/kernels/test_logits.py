"""The vocabulary-wide kernels after the lm_head match the torch ops they replace (kernels/logits.py)."""

import pytest
import torch

from nvfp4kit.engine.batch_sampler import greedy_table_torch as torch_greedy_table
from nvfp4kit.kernels import logits as logits_kernels

from .helpers import DEVICE

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 2049), (2, 40000)])
@pytest.mark.parametrize("cap", [30.0, None])
def test_softcap_matches_torch(rows, vocab, cap):
    gen = torch.Generator().manual_seed(rows * vocab)
    raw = (torch.randn(rows, vocab, generator=gen) * 40).to(torch.bfloat16).to(DEVICE)
    expected = torch.tanh(raw.float() / cap) * cap if cap else raw.float()
    got = logits_kernels.softcap_logits(raw, cap)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-5)


def test_softcap_writes_into_a_strided_buffer():
    raw = torch.randn(3, 1000).to(DEVICE)
    buffer = torch.full((4, 1100), 7.0, device=DEVICE)
    out = buffer[:3, :1000]  # the decode graph's logits: a view of a wider shared buffer
    assert logits_kernels.softcap_logits(raw, 30.0, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.tanh(raw / 30) * 30, rtol=2e-6, atol=2e-5)
    assert (buffer[3] == 7).all() and (buffer[:, 1000:] == 7).all()  # nothing written outside the view


@pytest.mark.parametrize("rows,vocab", [(1, 70000), (4, 3001), (2, 31)])
def test_greedy_table_matches_torch(rows, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 8).to(DEVICE)
    got = logits_kernels.greedy_table(logits)
    expected = torch_greedy_table(logits)
    assert torch.equal(got[:, 0], expected[:, 0])
    torch.testing.assert_close(got[:, 1], expected[:, 1], rtol=1e-5, atol=1e-5)


def test_greedy_table_ties_take_the_first_column():
    # the max sits in several splits and lanes: torch.argmax's first index must win
    logits = torch.zeros(3, 9000)
    logits[0, [8999, 4000, 130]] = 5.0
    logits[1, [1, 0]] = 2.0
    logits[2, 7777] = float("-inf")  # -inf columns count for nothing in the sum
    got = logits_kernels.greedy_table(logits.to(DEVICE)).cpu()
    expected = torch_greedy_table(logits)
    assert got[:, 0].tolist() == [130.0, 0.0, 0.0] == expected[:, 0].tolist()
    torch.testing.assert_close(got[:, 1], expected[:, 1], rtol=1e-6, atol=1e-6)
