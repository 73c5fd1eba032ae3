"""The start-up warm-up's plan (`engine/warmup.py` runs it): steps that between them launch every Triton kernel
variant a serving step can reach.

Pure arithmetic over the engine's limits and two functions of the model, card and attention backend:
`bucket_of(T)`, what a T-token step's kernels are compiled for (the linears' and the MoE's launch
configurations, and the power-of-two tile sizes some wrappers derive from counts), and `splits_of(d, keys)`,
the decode attention's split variant per layer kind (split or not, and the merge kernel's chunk). Everything else that changes from step to step
(sequence and decode-row counts, block-table widths, prefill tile counts, split counts, the alignment of the
metadata rows) reaches the kernels as unspecialised arguments (`do_not_specialize`), so it makes no variant.
`tests/engine/test_warmup.py` checks, with Triton's specialisation emulated on the CPU, that random traffic meets
no variant the plan missed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupStep:
    """One step of the warm-up: decode rows (the number of keys each attends over) and prefill chunks."""

    decodes: tuple[int, ...]  # keys of each decode row: its token sits at position keys - 1
    prefills: tuple[tuple[int, int], ...]  # (first position, length) of each prefill chunk

    @property
    def tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


@dataclass(frozen=True)
class StepLimits:
    max_tokens: int  # tokens of one step
    max_chunk: int  # tokens of one sequence's prefill chunk
    max_seqs: int  # sequences of one step
    max_len: int  # the longest context (positions)
    block_size: int
    eager_decode: bool  # decode-only steps run eagerly (no CUDA graphs), so they need warming too
    # keys of a prefill step from which its global layers read pre-rotated derived keys (another prefill-attention
    # variant and the rotation kernel, kernels/rotated_keys.py); 0: never
    prerotate_keys: int = 0


def representatives(values: Iterable[int], key: Callable[[int], Hashable]) -> list[int]:
    """The smallest value of each `key` class, ascending: a variant costs the same compile at any member of its
    class, and the smallest step runs fastest."""
    best: dict[Hashable, int] = {}
    for v in values:
        best.setdefault(key(v), v)
    return sorted(best.values())


def plan_steps(
    limits: StepLimits,
    *,
    bucket_of: Callable[[int], Hashable] = lambda t: None,
    splits_of: Callable[[int, int], Hashable] = lambda d, keys: None,
) -> list[WarmupStep]:
    """The warm-up's steps, no duplicates. `bucket_of(T)`: the compile-time classes of a T-token step;
    `splits_of(d, keys)`: the decode attention's split variants for d decode rows of at most `keys` keys."""
    lim = limits
    steps: dict[WarmupStep, None] = {}

    def add(decodes: Iterable[int], prefill_tokens: int, start: int = 0) -> bool:
        """A step of these decode rows and `prefill_tokens` in chunks of at most max_chunk (the first one at
        `start`); False when it does not fit the limits."""
        prefills, left = [], prefill_tokens
        while left > 0:
            n = min(left, lim.max_chunk)
            prefills.append((start if not prefills else 0, n))
            left -= n
        return add_step(tuple(decodes), tuple(prefills))

    def add_step(decodes: tuple[int, ...], prefills: tuple[tuple[int, int], ...]) -> bool:
        step = WarmupStep(decodes, prefills)
        fits = 0 < step.tokens <= lim.max_tokens and len(decodes) + len(prefills) <= lim.max_seqs
        fits = fits and all(k <= lim.max_len for k in decodes)
        fits = fits and all(n <= lim.max_chunk and s + n <= lim.max_len for s, n in prefills)
        if fits and (prefills or lim.eager_decode):  # decode-only steps replay CUDA graphs unless eager
            steps[step] = None
            return True
        return False

    # the largest step first: its activations and scratch are allocated now, not mid-serving
    add((), lim.max_tokens)
    # every class of the step's token count (launch configurations of the linears and the MoE), as a prefill
    for t in representatives(range(1, lim.max_tokens + 1), bucket_of):
        add((), t)
    # every class of the sampled-row count (the logits' rows): r - 1 decode rows and a two-token chunk
    context = min(lim.max_len, 2 * lim.block_size)
    for r in representatives(range(2, lim.max_seqs + 1), bucket_of):
        _ = add([context] * (r - 1), 2) or add([context] * r, 0)
    # every decode-attention split variant of every layer kind: its decode rows with a two-token chunk, and
    # without CUDA graphs also alone (a decode-only step, where one with a chunk does not fit)
    for d, keys in _split_examples(lim, splits_of):
        mixed = add([keys] * d, 2)
        if lim.eager_decode or not mixed:
            add([keys] * d, 0)
    # a chunk after a cached beginning and two chunks in one step (prefix-cache hits, admissions mid-prefill):
    # the same variants as above by now, kept so that a kernel specialised on either would show in the check
    add((), min(lim.max_chunk, 2), start=min(lim.block_size, lim.max_len - 2))
    if lim.max_tokens >= 4 and lim.max_seqs >= 2:
        add_step((), ((0, 2), (0, 2)))
    # a short chunk at the end of a context long enough for pre-rotated keys
    if 2 <= lim.prerotate_keys <= lim.max_len:
        add((), 2, start=lim.prerotate_keys - 2)
    return list(steps)


def _split_examples(lim: StepLimits, splits_of: Callable[[int, int], Hashable]) -> list[tuple[int, int]]:
    """(decode rows, keys) examples that between them reach every split variant of every layer kind (the kinds'
    kernels are separate variants, so one example covers a variant of each), fewest rows first."""
    covered: set[tuple[int, Hashable]] = set()
    examples = []
    grid = sorted({1, lim.max_len, *range(64, min(lim.max_len, 16384) + 1, 64),
                   *range(16384, lim.max_len + 1, 1024)})  # fmt: skip
    most = min(lim.max_seqs - 1, lim.max_tokens - 2)  # rows that leave room for a two-token chunk
    decode_rows = list(range(1, most + 1)) + ([lim.max_seqs] if lim.eager_decode else [])
    for d in decode_rows:
        for keys in grid:
            splits = splits_of(d, keys)
            parts = set(enumerate(splits)) if isinstance(splits, tuple) else {(0, splits)}
            if not parts <= covered:
                covered |= parts
                examples.append((d, keys))
    return examples
