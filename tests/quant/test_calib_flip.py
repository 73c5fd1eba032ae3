"""Greedy first-order moves (calib_flip): E4M3 neighbours are the next stored values, moves that lower the
judged loss are kept, and a round whose moves all make it worse leaves the slots as they were."""

from __future__ import annotations

import torch

from nvfp4kit.formats.nvfp4 import e2m1_decode, quantize, unpack_nibbles
from nvfp4kit.quant import calib_flip
from nvfp4kit.quant.calib_distill import distill_slot
from nvfp4kit.quant.calib_flip import _scale_steps, greedy_moves
from nvfp4kit.quant.calib_round import make_slot


def test_scale_steps_reach_the_neighbouring_e4m3_values():
    scales = torch.tensor([0.0, 2.0**-9, 1.0, 1.125, 448.0])
    up, down = _scale_steps(scales)
    assert up[0] == 0 and down[0] == 0  # a zero scale never moves
    assert down[1] == 0 and up[4] == 0  # nothing below the smallest subnormal or above 448
    moved_up = (scales[1:4] * up[1:4].exp()).to(torch.float8_e4m3fn).float()
    assert torch.equal(moved_up, torch.tensor([2.0**-8, 1.125, 1.25]))
    moved_down = (scales[2:] * down[2:].exp()).to(torch.float8_e4m3fn).float()
    assert torch.equal(moved_down, torch.tensor([0.9375, 1.0, 416.0]))


def _slot(seed: int):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    q = quantize(w)
    return distill_slot(make_slot(unpack_nibbles(q.packed), q.scale, q.scale_2, w, [])), w


def test_moves_lower_the_loss_they_are_judged_on(monkeypatch):
    monkeypatch.setattr(calib_flip, "FIRST_MOVES", 64)
    slot, w = _slot(0)
    target = w + 0.3 * torch.randn(8, 64, generator=torch.Generator().manual_seed(1))  # far from max's grid

    def loss(_windows=None):
        return (slot.weight() - target).pow(2).sum()

    def judged() -> float:
        with torch.no_grad():
            return float(loss())

    start = judged()
    history = greedy_moves(loss, [slot], [0], judged, batch=1, rounds=3)
    assert any(n > 0 for _, n, _ in history) and judged() < start
    codes = slot.final_codes()
    assert torch.equal(e2m1_decode(codes), slot.values.detach())  # codes and values agree
    assert slot.values.grad is None and not slot.values.requires_grad


def test_a_round_that_only_hurts_is_undone():
    slot, w = _slot(2)
    before = (slot.codes.clone(), slot.log_gain.detach().clone())

    def loss(_windows=None):  # the gradient points one way, the judge punishes any move
        return slot.weight().sum()

    def judged() -> float:
        with torch.no_grad():
            return float((slot.codes != before[0]).sum() + (slot.log_gain != before[1]).sum())

    history = greedy_moves(loss, [slot], [0], judged, batch=1, rounds=2)
    assert all(n == 0 for _, n, _ in history)
    assert torch.equal(slot.codes, before[0]) and torch.equal(slot.log_gain.detach(), before[1])
