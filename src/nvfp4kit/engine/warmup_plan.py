"""The start-up warm-up's plan (`engine/warmup.py` runs it): which steps reach every Triton kernel variant.

Pure arithmetic over the engine's limits and three functions of the model, card and attention backend:
`bucket_of(T)` (the launch configurations of a T-token step), `splits_of(d, keys)` (the decode attention's
key splits per layer kind) and `tiles_of(n)` (the prefill attention's tile count per layer kind). A step's
kernels specialise on what varies with it: the token count (integer classes: 1, divisible by 16, other; and
the 16-byte alignment of int64 metadata rows at 8 x T bytes), the counts of decode rows and of sequences
(int32 metadata rows at 4 x count bytes), the block-table width, the key splits and prefill tiles, and the
power of two some wrappers size tiles by. The families below cover those, and `tests/engine/test_warmup.py`
checks, with Triton's specialisation emulated on the CPU, that random traffic meets no variant the plan missed.
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


def spec_class(x: int) -> Hashable:
    """Triton's view of an integer: 1 apart, else how many times 2 divides it, up to 4 (16 | x). Covers the
    1 / divisible-by-16 integer classes and the 16-byte alignment of int32/int64 rows at offset x."""
    if x == 1:
        return "one"
    return min((x & -x).bit_length() - 1, 4)


def representatives(
    values: Iterable[int], key: Callable[[int], Hashable], *, largest: bool = False
) -> list[int]:
    """The smallest (or largest) value of each `key` class, ascending: a variant costs the same compile either
    way, and the smallest step runs fastest."""
    best: dict[Hashable, int] = {}
    for v in values:
        k = key(v)
        if k not in best or (v > best[k] if largest else v < best[k]):
            best[k] = v
    return sorted(best.values())


def plan_steps(
    limits: StepLimits,
    *,
    bucket_of: Callable[[int], Hashable] = lambda t: None,
    splits_of: Callable[[int, int], Hashable] = lambda d, keys: None,
    tiles_of: Callable[[int], Hashable] = lambda n: None,
) -> list[WarmupStep]:
    """The warm-up's steps, no duplicates. `bucket_of(T)`: launch configurations of a T-token step;
    `splits_of(d, keys)`: the decode attention's key splits for d decode rows of at most `keys` keys;
    `tiles_of(n)`: the prefill attention's tile count for an n-token chunk (per layer kind)."""
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
        if fits and (prefills or lim.eager_decode):
            steps[step] = None
            return True
        return False

    def with_class(d: int, target: Hashable) -> int:
        """The shortest prefill (>= 2 tokens) that makes a step of d decode rows a `target`-class token count."""
        for n in range(2, 34):
            if spec_class(d + n) == target:
                return n
        return 2

    # kernel wrappers also size tiles by the next power of two of a count (moe_align's CHUNK, w8a16's BM)
    token_counts = representatives(
        range(1, lim.max_tokens + 1), lambda t: (bucket_of(t), _pow2(t), spec_class(t))
    )
    add(
        (), lim.max_tokens
    )  # the largest step: its activations and scratch are allocated now, not mid-serving
    rows = representatives(range(1, lim.max_seqs + 1), lambda r: (min(_pow2(r), 64), spec_class(r)))
    split_examples = _split_examples(lim, splits_of)
    context = [keys for _, keys in split_examples] or [min(lim.max_len, 1024)]
    # every token count: alone, and with decode rows (rotating through the row counts and contexts)
    for i, t in enumerate(token_counts):
        add((), t)
        for j in (i, i + len(rows) // 2):
            d = rows[j % len(rows)]
            if d < t:
                add([context[(i + j) % len(context)]] * d, t - d)
        if t == 1:
            add([context[0]], 0)
    # every sampled-row count: decode rows plus a short prefill, of two token-count classes
    for i, r in enumerate(rows):
        for target in (4, 0):
            d = r - 1
            add([context[i % len(context)]] * d, with_class(d, target) if d else 1 + (target == 0))
        add([context[i % len(context)]] * r, 0)

    def decode_only(d: int, keys: int) -> None:
        """Eager decode-only steps of d rows at `keys`' split counts, at each class of block-table width."""
        same = splits_of(d, keys)
        for wanted in ("one", "16", "other"):
            fit = [k for k in _around(keys, lim.max_len, step=1)
                   if int_kind(-(-k // lim.block_size)) == wanted and splits_of(d, k) == same]  # fmt: skip
            if fit:
                add([fit[0]] * d, 0)

    # every reachable key-split count, with token counts divisible by 16 and odd by turns; without CUDA
    # graphs also as decode-only steps, and as one-row ones (a lone request decoding) where they reach it
    for i, (d, keys) in enumerate(split_examples):
        _ = add([keys] * d, with_class(d, (4, 0)[i % 2])) or add([keys] * d, 2)  # the shortest if no room
        if lim.eager_decode:
            decode_only(d, keys)
            lone = [k for k in _around(keys, lim.max_len) if splits_of(1, k) == splits_of(d, keys)]
            if lone:
                decode_only(1, lone[0])
    # busy steps (many decode rows: the split counts a loaded server meets), each split count with every
    # token-count class x block-table-width class x layout: decode rows 0-3 mod 4 and 1, 2 or 4 prefill chunks
    # (the metadata rows of the decode items and of the sequences start at 4 x their count bytes)
    most = min(lim.max_seqs - 1, lim.max_tokens - 2)
    busy = max(1, most // 4)
    bs = lim.block_size
    for d0, keys0 in split_examples:
        if d0 < busy:
            continue
        for d, keys, chunks in _busy_layouts(splits_of, d0, keys0, lim):
            if chunks == 0:  # a decode-only step (no CUDA graphs): its width is the decode rows' own
                decode_only(d, keys)
                continue
            tails = ((0, 2),) * (chunks - 1)  # two tokens each: a one-token chunk would be a decode item
            for target in (4, 0):
                n = with_class(d + 2 * (chunks - 1), target)
                # the block-table width (the longest table: the chunk's, after a cached beginning): 1, a
                # multiple of 16, any other
                least = max(-(-keys // bs), -(-n // bs))
                other = max(least, 2) + (max(least, 2) % 16 == 0)
                for width in {least + (-least) % 16, other} | ({1} if least == 1 else set()):
                    add_step(tuple([keys] * d), ((width * bs - n, n), *tails))
    # prefill tilings: tile-count classes x block-table-width classes, one chunk after a cached beginning,
    # alone, with one and with three decode rows
    for n in _covering(range(2, lim.max_chunk + 1), tiles_of):  # the chunk length alone: family 1
        least = -(-n // lim.block_size)
        widths = representatives(range(least, min(least + 33, lim.max_len // lim.block_size + 1)), spec_class)
        for w in widths:
            for decodes in ((), (1,), (1, 1, 1)):  # 1, 2 and 4 sequences: their metadata rows' alignments
                add(decodes, n, w * lim.block_size - n)
    # two prefill chunks in one step (a request admitted while another one's prefill goes on)
    for t in token_counts[:: max(1, len(token_counts) // 4)]:
        if t >= 4:
            add_step((), ((0, t // 2), (0, t - t // 2)))
    return list(steps)


def _covering(values: Iterable[int], parts: Callable[[int], Hashable]) -> list[int]:
    """Values (smallest first) that between them meet every (position, class) of `parts(value)`, a tuple with
    one class per layer kind (each kind's kernel is its own variant) or a single class."""
    covered: set[tuple[int, Hashable]] = set()
    chosen = []
    for v in values:
        classes = parts(v)
        pairs = set(enumerate(classes)) if isinstance(classes, tuple) else {(0, classes)}
        if not pairs <= covered:
            covered |= pairs
            chosen.append(v)
    return chosen


def _split_examples(lim: StepLimits, splits_of: Callable[[int, int], Hashable]) -> list[tuple[int, int]]:
    """(decode rows, keys) examples that between them reach every key-split count of every layer kind (the
    kinds' kernels are separate variants, so one example covers a count of each), many rows first (a busy
    server's steps)."""
    covered: set[tuple[int, Hashable]] = set()
    examples = []
    grid = sorted({1, lim.max_len, *range(64, min(lim.max_len, 16384) + 1, 64),
                   *range(16384, lim.max_len + 1, 1024)})  # fmt: skip
    most = min(lim.max_seqs - 1, lim.max_tokens - 2)  # rows that leave room for a prefill chunk
    decode_rows = [lim.max_seqs] if lim.eager_decode else []  # decode-only steps run eagerly too
    for d in decode_rows + list(range(most, 0, -1)):
        for keys in grid:
            splits = splits_of(d, keys)
            parts = set(enumerate(splits)) if isinstance(splits, tuple) else {(0, splits)}
            if not parts <= covered:
                covered |= parts
                examples.append((d, keys))
    return sorted(examples)


# (decode rows mod 4, prefill chunks): with the sequence count (rows + chunks) mod 4 they give every pair of
# (rows 0 mod 4, sequences 0 / 2 / 1 or 3 mod 4) a step can have
LAYOUTS = ((0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (0, 4))
DECODE_ONLY = ((0, 0), (1, 0), (2, 0), (-1, 0))  # -1: exactly one row (a one-token step)


def _busy_layouts(
    splits_of: Callable[[int, int], Hashable], d0: int, keys0: int, lim: StepLimits
) -> list[tuple[int, int, int]]:
    """(decode rows, keys, prefill chunks) near (d0, keys0) with the same key splits, one per layout."""
    same = splits_of(d0, keys0)
    found = []
    for residue, chunks in LAYOUTS + (DECODE_ONLY if lim.eager_decode else ()):
        most = min(lim.max_seqs - chunks, lim.max_tokens - 2 * chunks)
        for delta in range(9):
            rows = [d for d in {d0 - delta, d0 + delta} if (d == 1 if residue < 0 else d % 4 == residue)]
            rows = [d for d in (rows if residue >= 0 or delta == 0 else [1]) if 1 <= d <= most]
            hits = [(d, k) for d in rows for k in _around(keys0, lim.max_len) if splits_of(d, k) == same]
            if hits:
                found.append((*hits[0], chunks))
                break
    return found


def _around(keys: int, max_len: int, step: int = 64) -> list[int]:
    """`keys`, then contexts `step`, 2 `step`, ... keys away from it on both sides (within 1 .. max_len), up
    to 2,048 away."""
    out = [keys]
    for away in range(step, 2049, step):
        out += [k for k in (keys - away, keys + away) if 1 <= k <= max_len]
    return out


def int_kind(value: int) -> str:
    """Triton's classes of an integer argument (a block-table width, a block count): 1, a multiple of 16, other."""
    return "one" if value == 1 else "16" if value % 16 == 0 else "other"


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()
