"""Launch configurations for the W4A16 kernels: frozen dataclasses, a heuristic, and tuned tables per card.

A tuned table maps a weight shape and a token count to the fastest configuration measured on one card. Two
sources, the first that has the shape wins: the user's tuning cache (`nvfp4kit tune` writes it, under
`~/.cache/nvfp4kit/kernels/<card>/triton-<version>.json`, or `$NVFP4KIT_CACHE_DIR`), then the tables shipped in
`tuned/<card>.json`. Lookups pick the entry for the smallest tuned M at or above the actual M (else the largest,
up to twice the largest tuned M). Shapes no table has fall back to the heuristic, which sizes launches from the card's
SM count and uses only generic (SM80+) features.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from nvfp4kit.kernels.path_limits import FRAG_MAX_TOKENS, FRAG_TOKENS

TUNED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class LinearConfig:
    kernel: str = "dot"  # "dot" (tensor cores), "gemv" (CUDA cores, M <= block_m) or "frag" (gemv_mma.py)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    swap_ab: bool = False
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    decode: str = "bits"  # "bits" (portable Triton) or "asm" (PTX, SM80+)
    halves: bool = False  # FP4 low and high nibbles as even/odd K halves (dot: two MMAs; gemv: no interleave)
    # frag: unroll = K steps a loop trip, num_warps = warps splitting K, block_n = rows a program (groups of 8)
    unroll: int = 2

    def __post_init__(self) -> None:
        if self.kernel not in ("dot", "gemv", "frag"):
            raise ValueError(f"LinearConfig.kernel must be 'dot', 'gemv' or 'frag', got {self.kernel!r}")
        if self.kernel == "frag" and (self.block_m > 8 or self.block_n % 8 or not 8 <= self.block_n <= 64):
            raise ValueError(f"frag configs have block_m 8 and 8-64 rows in groups of 8, got {self}")
        if self.decode not in ("bits", "asm"):
            raise ValueError(f"LinearConfig.decode must be 'bits' or 'asm', got {self.decode!r}")
        if self.block_k % 32 or self.block_k < 32:
            raise ValueError(f"LinearConfig.block_k must be a multiple of 32, got {self.block_k}")
        if self.kernel == "dot" and min(self.block_m, self.block_n) < 16:
            raise ValueError(f"dot tiles need block_m, block_n >= 16, got {self.block_m}x{self.block_n}")


MOE_PATHS = (None, "tiles", "frag", "grouped")  # MoEConfig.path


@dataclass(frozen=True)
class MoEConfig:
    split: bool = False  # True: the few-token kernels of moe_split.py (the fields below that say so)
    sorted: bool = True  # False: pair mode (no sorting; for a few tokens)
    block_m: int = 16  # rows per expert block in sorted mode
    gate_up_block_n: int = 32
    gate_up_block_k: int = 128
    down_block_n: int = 64
    down_block_k: int = 64
    gate_up_warps: int = 4
    down_warps: int = 4
    num_stages: int = 3
    down_mode: str = "token"  # pair mode only: "token" (sum in registers) or "pair" (+ a sum kernel)
    # moe_align's method: "experts" (a program an expert; H100 session 35: the MoE layer 1.02-1.06x faster than
    # "triton"'s one program at 32-128 tokens), "triton" or "torch"
    align: str = "experts"
    decode: str = "bits"
    gate_up_split_k: int = 1  # split mode: programs sharing one gate_up tile's K
    down_split_k: int = 1  # split mode: programs sharing one down tile's K (per top-k slot)
    # sorted/pair mode: FP4 low and high nibbles as even/odd K halves, two MMAs, no interleave (nvfp4_tile.py)
    halves: bool = False
    # which kernels run (`moe_dispatch.moe_path`): None lets the token limits choose (NVFP4KIT_FRAG_GEMV,
    # NVFP4KIT_MOE_GROUPED_TOKENS); "tiles" the tiles above; "frag" (moe_frag.py, 1-8 tokens) or "grouped"
    # (moe_frag_grouped.py) where they run. `nvfp4kit tune` writes the path of the winner it timed
    path: str | None = None

    def __post_init__(self) -> None:
        if self.gate_up_split_k < 1 or self.down_split_k < 1:
            raise ValueError(
                f"MoEConfig split counts must be >= 1, got {self.gate_up_split_k} and {self.down_split_k}"
            )
        if self.down_mode not in ("token", "pair"):
            raise ValueError(f"MoEConfig.down_mode must be 'token' or 'pair', got {self.down_mode!r}")
        if self.align not in ("triton", "experts", "torch"):
            raise ValueError(f"MoEConfig.align must be 'triton', 'experts' or 'torch', got {self.align!r}")
        if self.decode not in ("bits", "asm"):
            raise ValueError(f"MoEConfig.decode must be 'bits' or 'asm', got {self.decode!r}")
        if self.path not in MOE_PATHS:
            raise ValueError(f"MoEConfig.path must be one of {MOE_PATHS}, got {self.path!r}")
        if min(self.gate_up_block_k, self.down_block_k) < 32 or self.block_m < 16:
            raise ValueError("MoEConfig needs block_k >= 32 and block_m >= 16")


def device_capability(device: torch.device | str) -> tuple[int, int]:
    """(major, minor) of a CUDA device, asked once per device: the query costs ~20 us of host time, too much for
    a per-launch check."""
    return _capability(torch.device(device).index)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@dataclass(frozen=True)
class StandIn:
    """A card that CPU tensors stand for while `tuning.cross_compile.compile_for` compiles kernels for it."""

    capability: tuple[int, int]
    sms: int


_stand_in: StandIn | None = None


def set_stand_in(card: StandIn | None) -> None:
    global _stand_in
    _stand_in = card
    _select_linear_cached.cache_clear()
    _select_moe_cached.cache_clear()


def kernel_capability(device: torch.device | str | None) -> tuple[int, int] | None:
    """The compute capability kernels launched on `device` are built for: a CUDA device's own, the stand-in
    card's while one is set, None for the CPU."""
    if _stand_in is not None:
        return _stand_in.capability
    if device is None or torch.device(device).type != "cuda":
        return None
    return device_capability(device)


def timed_tiles_fit(capability: tuple[int, int] | None) -> bool:
    """Whether a card is of the kind the attention tiles were timed on (H100/H200): data-center Hopper and
    Blackwell, sm_90 and sm_100, 227 KB of shared memory a block. Others (sm_80, 86, 89, 120) get tiles chosen by
    compiling for them (`nvfp4kit bench compile`). None (no card known) counts as one."""
    return capability is None or capability[0] in (9, 10)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU: TRITON_INTERPRET read as Triton reads it (1/true/on/y/yes)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "y", "yes")


def card_slug(device: torch.device | str | None = None) -> str:
    """'nvidia-h100-80gb-hbm3' style name of the CUDA card (used for tuned tables and result files)."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str | None) -> int:
    if _stand_in is not None:
        return _stand_in.sms
    if interpreting() or device is None or torch.device(device).type != "cuda":
        return 4
    index = torch.device(device).index
    return _sm_count(torch.cuda.current_device() if index is None else index)


_cache_dir_override: Path | None = None


def set_cache_dir(folder: str | Path | None) -> None:
    """Keep and read tuning tables under `folder` in this process (`tune --cache-dir`, `LLM(kernel_cache_dir=)`);
    None goes back to $NVFP4KIT_CACHE_DIR or the default. Tables already merged are read again."""
    global _cache_dir_override
    _cache_dir_override = None if folder is None else Path(folder).expanduser()
    forget_tables()


def cache_dir() -> Path:
    """Where `nvfp4kit tune` keeps its tables: the folder given to `set_cache_dir`, else $NVFP4KIT_CACHE_DIR,
    else ~/.cache/nvfp4kit/kernels."""
    if _cache_dir_override is not None:
        return _cache_dir_override
    override = os.environ.get("NVFP4KIT_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "nvfp4kit" / "kernels"


def cache_path(slug: str, triton_version: str) -> Path:
    """The user's tuning table for one card and Triton version (a new Triton compiles other code)."""
    return cache_dir() / slug / f"triton-{triton_version}.json"


def triton_version() -> str:
    import triton

    return triton.__version__


def _read_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=8)
def tables_for(slug: str, triton_version: str) -> dict:
    """The merged table of a card: per shape and M, the user's cache where it has the entry, else the shipped table."""
    merged = _read_table(TUNED_DIR / f"{slug}.json")
    for kind, shapes in _read_table(cache_path(slug, triton_version)).items():
        for shape, entries in shapes.items():
            merged.setdefault(kind, {}).setdefault(shape, {}).update(entries)
    return merged


def forget_tables() -> None:
    """Drop every cached lookup (after the tuning cache changed in this process)."""
    tables_for.cache_clear()
    _select_linear_cached.cache_clear()
    _select_moe_cached.cache_clear()


def _table_for(device) -> dict:
    if interpreting() or device is None or torch.device(device).type != "cuda":
        return {}
    return tables_for(card_slug(device), triton_version())


def _pick_bucket(entries: dict[str, dict], m: int) -> dict | None:
    """The entry of the smallest tuned M >= m, else of the largest; None (the heuristic) past twice the
    largest, where a decode-sized tile would run a prefill."""
    if not entries:
        return None
    tuned = sorted(int(k) for k in entries)
    if m > 2 * tuned[-1]:
        return None
    at_least = [t for t in tuned if t >= m]
    return entries[str(at_least[0] if at_least else tuned[-1])]


def _from_dict(cls, data: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)} in tuned table")
    return cls(**data)


def config_to_dict(config: LinearConfig | MoEConfig) -> dict:
    return asdict(config)


def _fill_split(tiles: int, k: int, block_k: int, target: int) -> int:
    """Split-K that brings `tiles` programs up to `target`, keeping at least two K tiles per split."""
    split = 1
    while tiles * split < target and k // (block_k * split * 2) >= 2:
        split *= 2
    return split


def heuristic_linear_config(m: int, n: int, k: int, *, sms: int) -> LinearConfig:
    """Launches sized from the card's SM count (rules read off tuning on the H100 and H200, 26B-A4B shapes).

    Decode reads each weight once, so the grid must give every SM several programs: one or two tokens stream
    W on the CUDA cores (8 rows x 1024 columns per program) while that makes <= 4 programs per SM, else on
    the tensor cores in 16-row tiles; up to 16 tokens use the narrowest column block that still makes ~1.5
    waves, split-K when even 64-wide blocks are too few; larger M uses big grouped tiles."""
    if m <= 2:
        if -(-n // 8) <= 4 * sms:
            return LinearConfig("gemv", m, 8, 1024, 1, num_warps=8 if k >= 4096 else 4, num_stages=3)
        return LinearConfig(block_m=16, block_n=16, block_k=256, num_warps=2, num_stages=3)
    if m <= 16:
        block_n = next((bn for bn in (64, 32, 16) if -(-n // bn) >= 3 * sms // 2), 64)
        split = _fill_split(-(-n // block_n), k, 256, sms) if block_n == 64 else 1
        warps = 2 if block_n == 16 else 4
        return LinearConfig(
            block_m=16, block_n=block_n, block_k=256, split_k=split, num_warps=warps, num_stages=3
        )
    if m <= 64:
        block_m = 32 if m <= 32 else 64
        split = _fill_split(-(-m // block_m) * -(-n // 64), k, 128, sms)
        return LinearConfig(block_m=block_m, block_n=64, block_k=128, split_k=split, num_stages=4)
    if m <= 256:
        return LinearConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    return LinearConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, group_m=8)


def _device_key(device) -> tuple[str, int]:
    if device is None:
        return ("cpu", -1)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, -1 if device.index is None else device.index)


def select_linear_config(m: int, n: int, k: int, *, device=None) -> LinearConfig:
    return _select_linear_cached(m, n, k, _device_key(device), interpreting())


def frag_linear_config(m: int, n: int, k: int, *, sms: int) -> LinearConfig:
    """The fragment GEMV (`gemv_mma.py`: 8 weight rows a program, warps splitting K) for up to 16 tokens: warps
    doubled up to 8 while the card holds fewer than ~24 a SM and each keeps at least two 128-weight K steps of
    every row. On the H100 within 1.09x of the best of 8 configs for every 26B-A4B linear at 1-16 tokens."""
    groups = -(-n // 8)
    k_warps = 1
    while k_warps < 8 and groups * k_warps < 24 * sms and k >= 512 * k_warps:
        k_warps *= 2
    return LinearConfig("frag", 8, 8, 256, 1, num_warps=k_warps, decode="asm", unroll=2)


@functools.lru_cache(maxsize=4096)
def _select_linear_cached(m: int, n: int, k: int, key: tuple[str, int], _interpret: bool) -> LinearConfig:
    device = None if key[0] == "cpu" else torch.device(key[0], key[1])
    capability = kernel_capability(device)
    frag = m <= FRAG_TOKENS and not _interpret and capability is not None and capability >= (8, 0)
    entry = _pick_bucket(_table_for(device).get("linear", {}).get(f"{n}x{k}", {}), m)
    cfg = None if entry is None else _from_dict(LinearConfig, entry)
    if frag:  # the fragment GEMV: a tuned table's own fragment config where it has one for this size
        tuned_frag = cfg is not None and cfg.kernel == "frag"
        return cfg if tuned_frag else frag_linear_config(m, n, k, sms=sm_count(device))
    if cfg is not None:
        fits = {"dot": True, "gemv": m <= cfg.block_m, "frag": m <= FRAG_MAX_TOKENS}[cfg.kernel]
        if fits:
            return cfg
    return heuristic_linear(m, n, k, device=device)


def heuristic_moe_config(
    tokens: int, num_experts: int, top_k: int, *, hidden: int = 2816, inter: int = 704, sms: int = 132
) -> MoEConfig:
    """Decode sizes: split mode with enough (pair, column block, K split) programs for ~2 waves of the card's
    SMs; larger batches: sorted grouped GEMMs with expert blocks sized to the rows each expert gets."""
    if tokens <= 8:
        gu_bn, gu_bk = 32, 256
        split = _fill_split(tokens * top_k * -(-inter // gu_bn), hidden, gu_bk, 2 * sms)
        return MoEConfig(
            split=True, gate_up_split_k=split, gate_up_block_n=gu_bn, gate_up_block_k=gu_bk,
            down_block_n=64, down_block_k=128,
        )  # fmt: skip
    per_expert = tokens * top_k / num_experts
    if per_expert <= 24:
        return MoEConfig(block_m=16)
    if per_expert > 128:  # prefill: 128-row expert blocks, 8-15% faster than 64 at 4096-8192 tokens (H200)
        return MoEConfig(
            block_m=128, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128, down_block_k=64,
            down_warps=8, gate_up_warps=8,
        )  # fmt: skip
    # mixed prefill + decode steps and prefill chunks, 4-warp gate_up tiles. H200, 26B-A4B MoE
    # (scripts/gpu_moe_midm_sweep.py, 47-120 tiles each): 360 us at 400 tokens with 32-row blocks (64 rows: 413),
    # 451 us at 706 with 64 (the tiles this replaced: 696), 1,010 us at 2,048 (1,120)
    if per_expert <= 32:
        return MoEConfig(
            block_m=32, gate_up_block_n=64, gate_up_block_k=128, down_block_n=128, down_block_k=64,
        )  # fmt: skip
    return MoEConfig(
        block_m=64, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128, down_block_k=64,
        gate_up_warps=4, down_warps=4 if per_expert <= 64 else 8,
    )  # fmt: skip


def heuristic_linear(m: int, n: int, k: int, *, device=None) -> LinearConfig:
    """The configuration a card without a tuned entry gets (what `select_linear_config` falls back to)."""
    return replace(heuristic_linear_config(m, n, k, sms=sm_count(device)), decode=_best_decode(device))


def heuristic_moe(
    tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, *, device=None
) -> MoEConfig:
    """The MoE configuration a card without a tuned entry gets."""
    cfg = heuristic_moe_config(tokens, num_experts, top_k, hidden=hidden, inter=inter, sms=sm_count(device))
    return replace(cfg, decode=_best_decode(device))


def select_moe_config(
    tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, *, device=None
) -> MoEConfig:
    return _select_moe_cached(tokens, num_experts, top_k, hidden, inter, _device_key(device), interpreting())


@functools.lru_cache(maxsize=4096)
def _select_moe_cached(tokens, num_experts, top_k, hidden, inter, key, _interpret) -> MoEConfig:
    device = None if key[0] == "cpu" else torch.device(key[0], key[1])
    shape = f"{num_experts}x{top_k}x{hidden}x{inter}"
    entry = _pick_bucket(_table_for(device).get("moe", {}).get(shape, {}), tokens)
    if entry is not None:
        return _from_dict(MoEConfig, entry)
    return heuristic_moe(tokens, num_experts, top_k, hidden, inter, device=device)


def _best_decode(device) -> str:
    """The PTX decoder on SM80+ CUDA devices (measured faster everywhere on the H100), else portable bits."""
    capability = kernel_capability(device)
    if interpreting() or capability is None:
        return "bits"
    return "asm" if capability >= (8, 0) else "bits"
