"""`side_by_side` (model/branches.py): both halves run and come back in order wherever they cannot overlap, and the
MoE's `overlap` question is asked only where they could (not on a CPU, not for prefill-sized steps)."""

import torch

from nvfp4kit.model.branches import MAX_OVERLAP_TOKENS, side_by_side


def _never() -> bool:
    raise AssertionError("overlap asked where the halves cannot overlap")


def test_halves_run_in_order_and_the_overlap_question_is_not_asked_on_a_cpu():
    calls = []
    x = torch.zeros(4, 8)
    a, b = side_by_side(
        x, lambda: calls.append("side") or 1, lambda: calls.append("main") or 2, overlap=_never
    )
    assert (a, b) == (1, 2) and calls == ["side", "main"]


def test_prefill_sized_steps_do_not_ask_and_decode_sized_ones_do(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    monkeypatch.setenv("NVFP4KIT_BRANCH_STREAMS", "1")
    assert torch.zeros(1).is_cuda
    assert side_by_side(torch.zeros(MAX_OVERLAP_TOKENS + 1, 8), lambda: 1, lambda: 2, overlap=_never) == (
        1,
        2,
    )
    asked = []
    # a MoE that fills the card: asked, says no, and the halves run one after the other (no stream is touched)
    out = side_by_side(torch.zeros(8, 8), lambda: 1, lambda: 2, overlap=lambda: asked.append(1) or False)
    assert out == (1, 2) and asked == [1]
