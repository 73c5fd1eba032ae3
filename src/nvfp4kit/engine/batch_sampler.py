"""The batched sampler: every sampled (non-greedy) row of a step in a few tensor ops on the logits' device.

Penalties, temperature, top-k, top-p and min-p are applied to all rows at once; when every row has a top-k
(Gemma 4's generation_config sets 64) only the largest `max(top_k)` logits of each row are sorted and sampled,
so nothing of vocabulary size leaves the device and nothing is sorted in full. Each row draws with the
exponential race (argmax of p / q, q ~ Exp(1)): a request with a seed draws its q from its own generator, so
its tokens do not depend on the other rows of the batch; one transfer to the host ends the step.

Same rules as the per-row `sampling.sample_token`: logprobs are of the model's raw distribution; a row with
nothing left to sample (every candidate masked, or non-finite) falls back to its greedy token.

`sample_step` samples one engine step's rows (greedy rows apart, a failing batch redone row by row) into a
table that stays on the device until `StepSamples.results()`: the overlap scheduler feeds its token column to
the next step before the host has seen it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nvfp4kit.engine.logits_processors import LogitsRow, host_to_device, process_logits
from nvfp4kit.sampling import SampleResult, SamplingParams, finite_logits, is_plain_greedy

log = logging.getLogger(__name__)

FULL_SORT_ABOVE = 4096  # a top-k larger than this (or none) sorts the whole row instead


@dataclass
class SampleRow:
    """One row's parameters and the token history its penalties need."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None


def apply_penalties_batch(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition penalty over prompt + output, presence/frequency over output, for every row at once."""
    device = logits.device
    rep_rows, rep_ids, rep_vals = [], [], []
    out_rows, out_ids, out_vals = [], [], []
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = set(row.prompt_ids) | set(row.output_ids)
            rep_rows += [i] * len(seen)
            rep_ids += seen
            rep_vals += [p.repetition_penalty] * len(seen)
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            counts: dict[int, int] = {}
            for t in row.output_ids:
                counts[t] = counts.get(t, 0) + 1
            out_rows += [i] * len(counts)
            out_ids += counts
            out_vals += [p.presence_penalty + p.frequency_penalty * c for c in counts.values()]
    if rep_rows:
        index = (torch.tensor(rep_rows, device=device), torch.tensor(rep_ids, device=device))
        penalty = torch.tensor(rep_vals, device=device, dtype=logits.dtype)
        vals = logits[index]
        logits[index] = torch.where(vals > 0, vals / penalty, vals * penalty)
    if out_rows:
        index = (torch.tensor(out_rows, device=device), torch.tensor(out_ids, device=device))
        logits.index_put_(index, -torch.tensor(out_vals, device=device, dtype=logits.dtype), accumulate=True)
    return logits


def _candidates(adjusted: torch.Tensor, rows: Sequence[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, token ids) of each row's candidates, largest first: its top max(top_k) or the whole row."""
    vocab = adjusted.shape[1]
    ks = [r.params.top_k if r.params.top_k and 0 < r.params.top_k < vocab else 0 for r in rows]
    width = max(ks) if all(ks) and max(ks) <= FULL_SORT_ABOVE else vocab
    if width < vocab:
        return torch.topk(adjusted, width, dim=1)
    return torch.sort(adjusted, dim=1, descending=True)


def _race_noise(rows: Sequence[SampleRow], shape: tuple[int, int], device) -> torch.Tensor:
    """Exp(1) draws per candidate. A seeded row draws from its own (CPU) generator exactly as many as it has
    candidates (its top-k, else the vocabulary), whatever the other rows ask for: its tokens depend on its seed
    alone. Columns past its top-k get +inf (those candidates are masked already)."""
    noise = torch.empty(shape, device=device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            k = row.params.top_k if row.params.top_k and 0 < row.params.top_k < shape[1] else shape[1]
            own = torch.full((shape[1],), float("inf"))
            own[:k] = torch.empty(k).exponential_(generator=row.generator)
            noise[i] = host_to_device(own, device)
    return noise


def _needs_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def sample_batch(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampleResult]:
    """Next token of each row of fp32 logits [B, V] (B == len(rows)); greedy rows (temperature 0) allowed.

    Per-row parameters travel in one host-to-device copy and the results in one device-to-host copy; every
    other step is a batched tensor op (a decode step pays a few tens of launches, not a few per row)."""
    return results_from_table(sample_table(logits, rows).tolist(), rows)


def sample_table(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """`sample_batch` without the transfer: float64 [B, 2 + 2 * want] on the logits' device, per row the token,
    its logprob, then `want` top logprobs and their ids (want = the largest `logprobs` asked)."""
    logits = logits.float()
    device = logits.device
    adjusted = finite_logits(logits)  # a new tensor: the penalties below may write into it
    if any(_needs_penalties(r.params) for r in rows):
        adjusted = finite_logits(apply_penalties_batch(adjusted, rows))
    tokens = adjusted.argmax(dim=1)  # greedy rows, and the fallback of rows with nothing left to sample
    if any(r.params.temperature for r in rows):
        table = [
            [r.params.temperature or 0.0, r.params.top_k or 0, r.params.top_p or 1.0, r.params.min_p]
            for r in rows
        ]
        temperature, top_k, top_p, min_p = host_to_device(torch.tensor(table), device).unbind(dim=1)
        values, ids = _candidates(adjusted, rows)
        scaled = values / torch.where(temperature > 0, temperature, 1.0)[:, None]
        rank = torch.arange(values.shape[1], device=device)[None, :]
        keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=1)
        keep &= (probs.cumsum(dim=1) - probs < top_p[:, None]) | (
            top_p[:, None] >= 1.0
        )  # the crossing token stays
        keep &= probs >= min_p[:, None] * probs[:, :1]  # candidates are sorted: column 0 holds the row's max
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=1)
        usable = (temperature > 0) & torch.isfinite(probs).all(dim=1) & (probs.sum(dim=1) > 0)
        race = (probs / _race_noise(rows, tuple(probs.shape), device)).nan_to_num(nan=-1.0)
        tokens = torch.where(usable, ids.gather(1, race.argmax(dim=1, keepdim=True))[:, 0], tokens)
    # logprobs of the model's raw distribution: logit - logsumexp, without a [B, V] log_softmax
    lse = torch.logsumexp(logits, dim=1)
    chosen = logits.gather(1, tokens[:, None])[:, 0] - lse
    want = max((r.params.logprobs or 0) for r in rows)
    columns = [tokens.double(), chosen.double()]
    if want:
        top_vals, top_ids = torch.topk(logits, min(want, logits.shape[1]), dim=1)
        columns += [*(top_vals - lse[:, None]).double().unbind(1), *top_ids.double().unbind(1)]
    return torch.stack(columns, dim=1)


@functools.cache
def _fused_greedy():
    """kernels.logits.greedy_table where Triton is installed (imported on first use: not on the CLI's path)."""
    try:
        from nvfp4kit.kernels.logits import greedy_table
    except ModuleNotFoundError:
        return None
    return greedy_table


def greedy_table(logits: torch.Tensor) -> torch.Tensor:
    """Argmax and its logprob per row of logits [B, V], as `sample_table` lays them out (float64 [B, 2]).

    On a GPU two Triton launches (kernels/logits.py) instead of torch's four passes over the vocabulary."""
    if logits.is_cuda and logits.dtype == torch.float32:
        fused = _fused_greedy()
        if fused is not None:
            return fused(logits)
    return greedy_table_torch(logits)


def greedy_table_torch(logits: torch.Tensor) -> torch.Tensor:
    """`greedy_table` in torch ops (the reference of the fused kernels)."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return torch.stack([tokens.double(), logprobs.double()], dim=1)


def results_from_table(
    host: list[list[float]], rows: Sequence[SampleRow | SamplingParams]
) -> list[SampleResult]:
    """`SampleResult`s from the host copy of a table of `sample_table` (each row keeps the logprobs it asked)."""
    results = []
    for row, values in zip(rows, host):
        want = (len(values) - 2) // 2
        n = (row.params if isinstance(row, SampleRow) else row).logprobs or 0
        top = [(int(values[2 + want + j]), values[2 + j]) for j in range(n)]
        results.append(SampleResult(int(values[0]), values[1], top))
    return results


@dataclass
class StepSamples:
    """One step's sampled rows: a table on the device first (`tokens` can feed the next step at once), copied
    to the host behind the step's own work; `results()` waits for that copy only, not for later steps."""

    table: torch.Tensor  # [B, C] float64 on the device, laid out as `sample_table`'s
    params: list[SamplingParams]
    failed: dict[int, str] = field(default_factory=dict)  # row -> why its sampling failed (its row is zeros)
    tokens: torch.Tensor = field(init=False)  # [B] int64 on the device
    _host: torch.Tensor = field(init=False)
    _copied: torch.cuda.Event | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = self.table[:, 0].long()
        if self.table.device.type == "cuda":
            self._host = torch.empty(self.table.shape, dtype=self.table.dtype, pin_memory=True)
            self._host.copy_(self.table, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = self.table

    def results(self) -> list[SampleResult | None]:
        """Per row its result, None for a failed row."""
        if self._copied is not None:
            self._copied.synchronize()
        results: list[SampleResult | None] = list(results_from_table(self._host.tolist(), self.params))
        for i in self.failed:
            results[i] = None
        return results


def sample_step(
    logits: torch.Tensor, logits_rows: Sequence[LogitsRow], rows: Sequence[SampleRow]
) -> StepSamples:
    """Sample every row of one step without waiting for the device: plain greedy rows together, the others
    through the batched sampler. If that batch fails, its rows are sampled one by one: a row whose sampling
    fails is reported in `failed` (its request ends alone); the others go on."""
    logits = process_logits(logits, logits_rows, [row.output_ids for row in rows])
    device = logits.device
    greedy = [i for i, row in enumerate(rows) if is_plain_greedy(row.params)]
    others = [i for i, row in enumerate(rows) if not is_plain_greedy(row.params)]
    params = [row.params for row in rows]
    if not others:
        return StepSamples(greedy_table(logits), params)
    parts: list[tuple[list[int], torch.Tensor]] = []
    if greedy:
        parts.append((greedy, greedy_table(logits[host_to_device(torch.tensor(greedy), device)])))
    failed: dict[int, str] = {}
    subset = logits if len(others) == len(rows) else logits[host_to_device(torch.tensor(others), device)]
    try:
        parts.append((others, sample_table(subset, [rows[i] for i in others])))
    except Exception:  # find the row that broke it below, one by one
        log.exception("batched sampling failed; sampling its %d rows one by one", len(others))
        for i in others:
            try:  # the same rules row by row: a seeded row draws the same token as in the batch
                parts.append(([i], sample_table(logits[i : i + 1], [rows[i]])))
            except Exception as exc:  # this row's parameters broke it: its request ends alone
                log.exception("sampling failed for row %d", i)
                failed[i] = f"sampling failed: {exc}"
    if len(parts) == 1 and parts[0][0] == list(range(len(rows))):
        return StepSamples(parts[0][1], params, failed)
    want = max((part.shape[1] - 2) // 2 for _, part in parts)
    table = torch.zeros(len(rows), 2 + 2 * want, dtype=torch.float64, device=device)
    for index, part in parts:  # a part with fewer top logprobs keeps its ids at the table's id columns
        have = (part.shape[1] - 2) // 2
        gap = torch.zeros(len(index), want - have, dtype=torch.float64, device=device)
        spread = torch.cat([part[:, : 2 + have], gap, part[:, 2 + have :], gap], dim=1)
        table.index_copy_(0, host_to_device(torch.tensor(index), device), spread)
    return StepSamples(table, params, failed)
