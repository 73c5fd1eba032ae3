"""Greedy first-order moves of NVFP4 codes and block scales against the whole model's KL (calib_distill).

Adam (or signed steps) on straight-through offsets moves every element at about the same speed whatever its
gradient says, so after k steps all codes within k * lr of a rounding boundary flip together, most of them
on noise: on the demo model the calibration KL of two windows it trained on jumped 4-14x at the first mass
flip. Here nothing moves on a guess: each round takes the gradient of the mean KL over ALL training windows
(a deterministic, full-batch estimate) with respect to every code's E2M1 value and every block scale's log,
predicts each single move's change of the loss to first order (a code one grid step up or down, a scale one
E4M3 step up or down), and applies only the K moves with the largest predicted gain. K is chosen per round
from {K/4, K, 4K} by the kept-aside windows' KL; a round none of them improves is not applied and shrinks K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4kit.formats.nvfp4 import e2m1_encode
from nvfp4kit.quant.calib_round import _GRID, RoundingSlot

ROUNDS = 8  # full-batch gradient passes
FIRST_MOVES = 16_384  # K of the first round
MIN_MOVES = 64  # stop once K falls below this

_E4M3_MAX_BITS = 0x7E  # 448; 0x7F is NaN


def _neighbours(grid: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.searchsorted(grid, values.contiguous())
    up = grid[(idx + 1).clamp(max=len(grid) - 1)] - grid[idx]
    down = grid[idx] - grid[(idx - 1).clamp(min=0)]
    return up, down


def _scale_steps(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(next E4M3 value / value) up and down (0 where there is no neighbour, or the scale is 0)."""
    bits = scales.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    up = (bits + 1).clamp(max=_E4M3_MAX_BITS).to(torch.uint8).view(torch.float8_e4m3fn).float()
    down = (bits - 1).clamp(min=0).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ok_up, ok_down = (scales > 0) & (bits < _E4M3_MAX_BITS), (scales > 0) & (down > 0)
    safe = scales.clamp_min(1e-30)
    return (
        torch.where(ok_up, torch.log(up / safe), 0.0),
        torch.where(ok_down, torch.log(down.clamp_min(1e-30) / safe), 0.0),
    )


def _state(slots: list[RoundingSlot]) -> list[tuple[torch.Tensor, ...]]:
    return [(s.values.detach().clone(), s.codes.clone(), s.log_gain.detach().clone()) for s in slots]


def _restore(slots: list[RoundingSlot], state: list[tuple[torch.Tensor, ...]]) -> None:
    with torch.no_grad():
        for s, (values, codes, gain) in zip(slots, state):
            s.values.copy_(values)
            s.codes.copy_(codes)
            s.log_gain.copy_(gain)
            s.step_up, s.step_down = _neighbours(_grid(s), s.values.detach())


def _grid(slot: RoundingSlot) -> torch.Tensor:
    return torch.tensor(_GRID, dtype=torch.float32, device=slot.values.device)


def _gains(slots: list[RoundingSlot]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """Predicted loss change of the best single move of every code and scale (<= 0), flat, and per slot the
    (code direction, scale log step) that move takes."""
    flat, moves = [], []
    for s in slots:
        g = s.values.grad if s.values.grad is not None else torch.zeros_like(s.values)
        code_gain = torch.where(g < 0, g * s.step_up, -g * s.step_down).clamp(max=0)
        direction = torch.where(g < 0, 1, -1).to(torch.int8)
        gg = s.log_gain.grad if s.log_gain.grad is not None else torch.zeros_like(s.log_gain)
        up, down = _scale_steps(s.block_scales().detach())
        up_gain, down_gain = gg * up, gg * down
        scale_gain = torch.minimum(up_gain, down_gain).clamp(max=0)
        scale_step = torch.where(up_gain <= down_gain, up, down)
        flat += [code_gain.reshape(-1), scale_gain.reshape(-1)]
        moves.append((direction, scale_step))
    return torch.cat(flat), moves


def _apply(slots: list[RoundingSlot], moves: list[tuple[torch.Tensor, ...]], chosen: torch.Tensor) -> None:
    """Make the moves at flat indices `chosen` (in _gains' order)."""
    offset = 0
    with torch.no_grad():
        for s, (direction, scale_step) in zip(slots, moves):
            n_codes, n_scales = s.values.numel(), s.log_gain.numel()
            pick = chosen[(chosen >= offset) & (chosen < offset + n_codes)] - offset
            if pick.numel():
                values = s.values.view(-1)
                step = torch.where(direction.view(-1)[pick] > 0, s.step_up.view(-1)[pick],
                                   -s.step_down.view(-1)[pick])  # fmt: skip
                values[pick] += step
                s.codes.view(-1)[pick] = e2m1_encode(values[pick])
                s.step_up, s.step_down = _neighbours(_grid(s), s.values.detach())
            offset += n_codes
            pick = chosen[(chosen >= offset) & (chosen < offset + n_scales)] - offset
            if pick.numel():
                s.log_gain.view(-1)[pick] += scale_step.view(-1)[pick]
            offset += n_scales


def _best(gains: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the (up to) `count` moves with the most negative predicted change."""
    chosen = torch.topk(gains, min(count, gains.numel()), largest=False).indices
    return chosen[gains[chosen] < 0]


def greedy_moves(
    loss_on: Callable[[list[int]], torch.Tensor],
    slots: list[RoundingSlot],
    train: list[int],
    kept_kl: Callable[[], float],
    *,
    batch: int,
    rounds: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[int, int, float]]:
    """Rounds of the best first-order moves; leaves the slots at the best kept-aside KL found. Returns
    (round, moves applied, kept-aside KL) per round."""
    rounds = ROUNDS if rounds is None else rounds
    for s in slots:
        s.values.requires_grad_(True)
        s.offset.requires_grad_(False)
    current, k, history = kept_kl(), FIRST_MOVES, []
    gains = moves = None  # kept while a round applies nothing: the slots, so the gradient, are the same
    try:
        for r in range(1, rounds + 1):
            if k < MIN_MOVES:
                break
            if gains is None or moves is None:
                for s in slots:
                    s.values.grad = s.log_gain.grad = None
                for i in range(0, len(train), batch):
                    chunk = train[i : i + batch]
                    (loss_on(chunk) * (len(chunk) / len(train))).backward()
                gains, moves = _gains(slots)
            saved = _state(slots)
            trials = []
            for count in (k // 4, k, 4 * k):
                chosen = _best(gains, count)
                _apply(slots, moves, chosen)
                trials.append((kept_kl(), count, int(chosen.numel())))
                _restore(slots, saved)
            best, count, applied = min(trials)
            if log is not None:
                tried = ", ".join(f"{c}: {v:.5f}" for v, c, _ in trials)
                log(f"round {r}: kept-aside KL {current:.5f} -> {tried}")
            if best < current:
                _apply(slots, moves, _best(gains, count))
                current, k, gains, moves = best, count, None, None
                history.append((r, applied, best))
            else:
                k //= 4
                history.append((r, 0, current))
    finally:
        for s in slots:
            s.values.requires_grad_(False)
            s.values.grad = None
            s.offset.requires_grad_(True)
    return history
