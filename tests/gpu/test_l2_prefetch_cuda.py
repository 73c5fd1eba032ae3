"""L2 prefetches from a third stream (model/prefetch.py) change no number and survive CUDA graph capture.

Same tiny MoE engine as the two-stream test: greedy decode with every prefetch point on must give the tokens and
bitwise the logprobs of the run without, in graph replays and eagerly; the prefetch kernel itself must run on
a weight of odd size (its last program repeats the last line).
"""

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.kernels.l2_prefetch import prefetch_l2
from nvfp4kit.model.prefetch import POINTS, set_prefetch_points
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny_config import tiny_text_config
from tests.gpu.test_branch_streams_cuda import decode

pytestmark = pytest.mark.cuda


def test_prefetch_kernel_runs_on_odd_sizes():
    for nbytes in (1, 127, 129, 4096 * 128 + 3):
        t = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        before = t.clone()
        prefetch_l2(t)
        torch.cuda.synchronize()
        assert torch.equal(t, before)


def test_prefetch_points_give_bitwise_the_same_tokens_and_logprobs():
    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, device="cuda")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, cfg.vocab_size, (n,), generator=gen).tolist() for n in (7, 260, 40)]
    try:
        set_prefetch_points(frozenset())
        off = decode(model, prompts)
        set_prefetch_points(frozenset(POINTS))
        on = decode(model, prompts)
    finally:
        set_prefetch_points(None)
    assert on == off
