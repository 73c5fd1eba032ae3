"""Start-up warm-up: the Triton kernel variants a serving step can reach, compiled before the first request.

Triton compiles a kernel lazily, once per combination of its constexpr arguments and of the specialisation of
its other arguments: an integer equal to 1 or divisible by 16, and a pointer aligned to 16 bytes, each get a
variant of their own. So a step whose token count, sequence count, decode context or prefill tiling meets a
combination no step before it had waits for a compile (0.3-2 s on an H200), and every stream of the batch sees
that gap. CUDA-graph capture covers the decode-only batches; `warm_up` covers the other steps.

The plan (`plan_steps`, pure arithmetic) takes one token count per launch-configuration bucket
(`select_linear_config` / `select_moe_config` of the model's shapes, the dequantize-then-cuBLAS and grouped-MoE
thresholds) and per specialisation class (1, odd, 2, 4, 8, 16 mod 16: also the alignment of int32/int64 rows
that views of the step's metadata start at), one sampled-row count per class, every reachable set of key
splits of the decode attention, and the prefill-attention tilings (tile count x block-table width). Each step
is a list of decode rows and prefill chunks that the scheduler could form. `warm_up` runs them through the
engine's real forward (`BatchContext`, `hidden_states`, `logits`) on dummy tokens, so a kernel the plan does not
name is still met. All sequences write into one scratch global block (every block-table entry names it) and one
scratch sliding ring; their rows are saved first and written back after, and nothing goes through the
scheduler or the prefix cache, so the pools, free lists and cache end as they started.

Compilations after it are counted and logged by `engine/kernel_compiles.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nvfp4kit.engine.attention_backend import select_attention_backend
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.kernel_compiles import COMPILES

if TYPE_CHECKING:
    from nvfp4kit.engine.engine import Engine

log = logging.getLogger(__name__)


# ---- the plan -------------------------------------------------------------------------------------------
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

    token_counts = representatives(range(1, lim.max_tokens + 1), lambda t: (bucket_of(t), spec_class(t)))
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
    # every reachable key-split count, with token counts divisible by 16 and odd by turns
    for i, (d, keys) in enumerate(split_examples):
        _ = add([keys] * d, with_class(d, (4, 0)[i % 2])) or add([keys] * d, 2)  # the shortest if no room
        add([keys] * d, 0)
    # busy steps (many decode rows, the split counts a loaded server meets): every token-count class x
    # block-table-width class x alignment of the decode-row and sequence counts (metadata rows start at
    # 4 * count bytes), at each split count
    most = min(lim.max_seqs - 1, lim.max_tokens - 2)
    busy = max(1, most // 4)
    for d0, keys0 in split_examples:
        if d0 < busy:
            continue
        for d, keys in _busy_rows(splits_of, d0, keys0, most_rows=most, max_len=lim.max_len):
            for target in (4, 0):
                n = with_class(d, target)
                # the block-table width (the longest table: the chunk's, after a cached beginning): 1, a
                # multiple of 16, any other
                least = max(-(-keys // lim.block_size), -(-n // lim.block_size))
                other = max(least, 2) + (max(least, 2) % 16 == 0)
                for width in {least + (-least) % 16, other} | ({1} if least == 1 else set()):
                    add([keys] * d, n, start=width * lim.block_size - n)
    # prefill tilings: tile-count classes x block-table-width classes, one chunk after a cached beginning,
    # alone and with three decode rows (four sequences: their metadata rows aligned)
    for n in representatives(range(2, lim.max_chunk + 1), tiles_of):  # the chunk length alone: family 1
        least = -(-n // lim.block_size)
        widths = representatives(range(least, min(least + 33, lim.max_len // lim.block_size + 1)), spec_class)
        for w in widths:
            add((), n, w * lim.block_size - n)
            add((1, 1, 1), n, w * lim.block_size - n)
    # two prefill chunks in one step (a request admitted while another one's prefill goes on)
    for t in token_counts[:: max(1, len(token_counts) // 4)]:
        if t >= 4:
            add_step((), ((0, t // 2), (0, t - t // 2)))
    return list(steps)


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


def _busy_rows(
    splits_of: Callable[[int, int], Hashable], d0: int, keys0: int, *, most_rows: int, max_len: int
) -> list[tuple[int, int]]:
    """(decode rows, keys) near (d0, keys0) with the same key splits, rows 0, 1 and 3 mod 4 (with one prefill
    chunk: the rows' metadata aligned to 16 bytes, neither, the sequences' metadata aligned)."""
    same = splits_of(d0, keys0)
    found = []
    for residue in (0, 1, 3):
        for delta in range(9):
            rows = [d for d in {d0 - delta, d0 + delta} if d % 4 == residue and 1 <= d <= most_rows]
            hits = [(d, k) for d in rows for k in _around(keys0, max_len) if splits_of(d, k) == same]
            if hits:
                found.append(hits[0])
                break
    return found


def _around(keys: int, max_len: int) -> list[int]:
    """`keys`, then contexts 64, 128, ... keys away from it on both sides (within 1 .. max_len)."""
    out = [keys]
    for step in range(64, 2049, 64):
        out += [k for k in (keys - step, keys + step) if 1 <= k <= max_len]
    return out


def _nearest(x: int, ok: Callable[[int], bool], reach: int = 8) -> int | None:
    """The value closest to x (x itself first, then x - 1, x + 1, ...) within `reach` that is `ok`."""
    for delta in range(reach + 1):
        for y in (x - delta, x + delta) if delta else (x,):
            if ok(y):
                return y
    return None


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


# ---- the plan for one engine ----------------------------------------------------------------------------
def engine_plan(engine: Engine) -> list[WarmupStep]:
    """`plan_steps` for this engine's model, limits, card and attention backend."""
    from nvfp4kit.kernels import configs

    model, cfg, device = engine.model, engine.model.config, engine.device
    sched = engine.scheduler.config
    limits = StepLimits(
        max_tokens=sched.max_num_batched_tokens, max_chunk=sched.max_prefill_chunk,
        max_seqs=engine.config.max_num_seqs, max_len=min(engine.max_model_len, engine.pool_tokens),
        block_size=engine.layout.block_size, eager_decode=engine.graphs is None,
    )  # fmt: skip
    linears, experts = _quantized_shapes(model)
    thresholds = _path_thresholds()

    def bucket_of(t: int) -> Hashable:
        lin = tuple(configs.select_linear_config(t, n, k, device=device) for n, k in linears)
        moe = tuple(
            configs.select_moe_config(t, e, cfg.top_k_experts, h, i, device=device) for e, h, i in experts
        )
        return lin, moe, tuple(t >= m for m in thresholds)

    backend = select_attention_backend(device, engine.config.attention_backend)
    if backend.name != "triton":  # the torch attention compiles nothing
        return plan_steps(limits, bucket_of=bucket_of)
    from nvfp4kit.kernels.paged_attention import choose_num_splits
    from nvfp4kit.kernels.prefill_attention import prefill_block_q

    kinds = sorted({
        (cfg.sliding_window if cfg.is_sliding(layer) else None, cfg.layer_kv_heads(layer),
         cfg.layer_head_dim(layer))
        for layer in range(cfg.num_hidden_layers)
    }, key=str)  # fmt: skip

    def splits_of(d: int, keys: int) -> Hashable:
        return tuple(choose_num_splits(d, kvh, min(keys, w or keys), device=device) for w, kvh, _ in kinds)

    def tiles_of(n: int) -> Hashable:
        tiles = (math.ceil(n / prefill_block_q(hd, cfg.num_attention_heads // kvh)) for _, kvh, hd in kinds)
        return tuple(spec_class(t) for t in tiles)

    return plan_steps(limits, bucket_of=bucket_of, splits_of=splits_of, tiles_of=tiles_of)


def _quantized_shapes(model: torch.nn.Module) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(N, K) of the NVFP4 linears and (experts, hidden, intermediate) of the NVFP4 expert stacks."""
    linears, experts = set(), set()
    for module in model.modules():
        packed = getattr(module, "weight_packed", None)
        if isinstance(packed, torch.Tensor) and packed.dim() == 2:
            linears.add((packed.shape[0], packed.shape[1] * 2))
        gate_up = getattr(module, "gate_up_packed", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
            experts.add((gate_up.shape[0], gate_up.shape[2] * 2, gate_up.shape[1] // 2))
    return sorted(linears), sorted(experts)


def _path_thresholds() -> tuple[int, ...]:
    """Token counts from which the linears and the MoE take another path (dequantize + cuBLAS, grouped GEMM)."""
    try:
        from nvfp4kit.kernels.moe_prefill import MOE_PREFILL_MIN_TOKENS
        from nvfp4kit.kernels.w4a16_linear import DEQUANT_MIN_M
    except ModuleNotFoundError:  # no Triton: the torch backend has no such paths
        return ()
    return DEQUANT_MIN_M, MOE_PREFILL_MIN_TOKENS


# ---- running it -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupReport:
    steps: int
    seconds: float
    compiles: int | None  # kernel variants compiled (or loaded from Triton's disk cache); None: not counted
    max_tokens: int  # the largest step's tokens


def warmup_wanted(warmup: bool | None, device: torch.device) -> bool:
    """`EngineConfig.warmup`: None means on CUDA only (on the CPU nothing is compiled but the steps cost)."""
    return device.type == "cuda" if warmup is None else warmup


@torch.inference_mode()
def warm_up(engine: Engine, steps: list[WarmupStep] | None = None) -> WarmupReport:
    """Run `steps` (default: `engine_plan(engine)`) through the engine's forward on dummy tokens, leaving the
    KV pools, free lists and prefix cache as they were. The engine must be idle."""
    if engine.scheduler.has_work() or engine._in_flight is not None:
        raise RuntimeError("the warm-up needs an idle engine (no request queued or running)")
    t0 = time.perf_counter()
    steps = engine_plan(engine) if steps is None else steps
    counting = COMPILES.install()
    before = COMPILES.counts()[0]
    serving, COMPILES.ready = (
        COMPILES.ready,
        False,
    )  # (a warm-up after the engine was ready: its own compiles)
    gen = torch.Generator().manual_seed(0)
    with _ScratchKV(engine.cache) as (block, ring):
        for step in steps:
            _run_step(engine, step, block, ring, gen)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # a failing launch fails here, not in the first request
    COMPILES.ready = serving
    report = WarmupReport(
        steps=len(steps),
        seconds=time.perf_counter() - t0,
        compiles=COMPILES.counts()[0] - before if counting else None,
        max_tokens=max((s.tokens for s in steps), default=0),
    )
    log.info(
        "warm-up: %d steps of 1-%d tokens in %.1f s; %s kernel variants compiled or loaded from Triton's cache",
        report.steps, report.max_tokens, report.seconds, "uncounted" if report.compiles is None else report.compiles,
    )  # fmt: skip
    return report


def _run_step(engine: Engine, step: WarmupStep, block: int, ring: int, gen: torch.Generator) -> None:
    """One step as `Engine.step` runs it (every sequence sampled), all KV in the scratch block and ring."""
    blocks_for = engine.cache.blocks_for
    seqs, sampled, offset = [], [], 0
    for keys in step.decodes:
        seqs.append(SeqSlice(keys - 1, 1, offset, [block] * blocks_for(keys), ring))
        sampled.append(offset)
        offset += 1
    for start, n in step.prefills:
        seqs.append(SeqSlice(start, n, offset, [block] * blocks_for(start + n), ring))
        offset += n
        sampled.append(offset - 1)
    model, device = engine.model, engine.device
    ids = torch.randint(0, model.config.vocab_size, (offset,), generator=gen).to(device)
    ctx = BatchContext(model, engine.cache, seqs, device, backend=engine.config.attention_backend)
    hidden = model.hidden_states(ids, ctx)
    model.logits(hidden[torch.tensor(sampled, device=device)])


class _ScratchKV:
    """One global block and one sliding ring for the warm-up: never-used ones (no cached prefix is evicted),
    their rows zeroed for the warm-up (no NaN from stale bytes) and written back afterwards."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.saved: list[tuple[torch.Tensor, slice, torch.Tensor]] = []

    def __enter__(self) -> tuple[int, int]:
        cache = self.cache
        plain_blocks = getattr(cache.free_blocks, "plain", cache.free_blocks)
        plain_rings = getattr(cache.free_rings, "plain", cache.free_rings)
        if not plain_blocks or not plain_rings:
            raise RuntimeError("the warm-up needs one unused global block and one unused sliding ring")
        self.block, self.ring = cache.allocate_blocks(1)[0], cache.allocate_ring()
        layout, cfg = cache.layout, cache.cfg
        bs, rs = layout.block_size, layout.ring_size
        rows = {layer: slice(self.block * bs, (self.block + 1) * bs) for layer in layout.global_layers(cfg)}
        rows |= {layer: slice(self.ring * rs, (self.ring + 1) * rs) for layer in layout.sliding_layers(cfg)}
        for layer, where in rows.items():
            for store in (cache.keys.get(layer), cache.values[layer]):
                if store is not None:
                    self.saved.append((store, where, store[where].clone()))
                    store[where].zero_()
        return self.block, self.ring

    def __exit__(self, *exc_info: object) -> None:
        for store, where, rows in self.saved:
            store[where].copy_(rows)
        self.saved.clear()
        self.cache.free([self.block], self.ring)
