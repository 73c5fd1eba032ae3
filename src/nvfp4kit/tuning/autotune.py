"""Tuning on the user's card: time the W4A16 kernels' candidate configurations at one model's shapes and keep the
fastest in the tuning cache (`kernels.configs.cache_path`), which every later run on this card and Triton uses.

Shapes come from the model definition itself (built on the meta device), so a new checkpoint shape needs no
table edit. Each candidate is checked against the dequantized fp32 product before it is timed (CUDA-graph
replays over rotated weight copies, so weights stream from device memory, as in a decode step).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.kernels.configs import (
    cache_path,
    card_slug,
    config_to_dict,
    forget_tables,
    sm_count,
    tables_for,
    triton_version,
)
from nvfp4kit.kernels.path_limits import FRAG_TOKENS
from nvfp4kit.tuning.cases import DenseCase, MoECase
from nvfp4kit.tuning.search import Budget, linear_candidates, moe_candidates, tune_case
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets

# decode batches, then prefill chunks: the token counts the engine runs most
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)


@dataclass(frozen=True)
class ModelShapes:
    linear: tuple[tuple[int, int], ...]  # (N, K) of every NVFP4 linear (fused projections concatenated)
    moe: dict[str, int] | None  # experts, top_k, hidden, inter


def model_shapes(cfg: Gemma4TextConfig) -> ModelShapes:
    """The distinct kernel shapes of a Gemma 4 model, read off the one model definition."""
    from nvfp4kit.model.gemma4 import Experts, Gemma4Model, Router
    from nvfp4kit.model.layers import Linear

    with torch.device("meta"):
        model = Gemma4Model(cfg)
    routers = {id(m.proj) for m in model.modules() if isinstance(m, Router)}  # routers stay BF16
    linear = sorted(
        {
            (m.out_features, m.in_features)
            for m in model.modules()
            if isinstance(m, Linear) and id(m) not in routers
        }
    )
    experts = next((m for m in model.modules() if isinstance(m, Experts)), None)
    moe = None
    if experts is not None:
        e, two_i, h = experts.gate_up_shape
        moe = {"experts": e, "top_k": cfg.top_k_experts, "hidden": h, "inter": two_i // 2}
    return ModelShapes(tuple(linear), moe)


def tune_model(
    cfg: Gemma4TextConfig,
    *,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    budget_s: float | None = None,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = True,
    missing_only: bool = False,
    kernels: Sequence[str] = ("linear", "moe"),
) -> tuple[dict, str]:
    """Tune every shape of `cfg` on the current CUDA device; merge the winners into the tuning cache.
    `missing_only`: skip (shape, M) entries the card's tables (cache or shipped) already have; `kernels`: which
    of "linear" and "moe" to tune.

    Returns (the table of winners, the cache file written)."""
    if not torch.cuda.is_available():
        raise RuntimeError("tuning times the kernels on a CUDA GPU; none is available")
    device = torch.device("cuda", torch.cuda.current_device())
    shapes = model_shapes(cfg)
    sms, l2 = sm_count(device), l2_cache_bytes()
    # the fragment GEMV (SM80+) is a candidate unless NVFP4KIT_FRAG_GEMV=0 turned it off
    frag = FRAG_TOKENS > 0 and torch.cuda.get_device_capability(device) >= (8, 0)
    budget = Budget(budget_s)
    jobs = [("linear", shape, m) for shape in shapes.linear for m in tokens] if "linear" in kernels else []
    jobs += [("moe", None, m) for m in tokens] if shapes.moe and "moe" in kernels else []
    if missing_only:
        have = tables_for(card_slug(device), triton_version())
        jobs = [job for job in jobs if str(job[2]) not in have.get(job[0], {}).get(_key(job, shapes), {})]
    table: dict = {}
    bar = tqdm(jobs, desc="tuning", unit="shape", disable=not progress)
    for kind, shape, m in bar:
        bar.set_postfix_str(f"{kind} {shape or ''} M={m}")
        if kind == "linear":
            n, k = shape
            sets = rotation_sets(n * k * 9 // 16 + 2 * m * k, l2_bytes=l2)
            case = DenseCase.build(f"{n}x{k}", n, k, m, sets=sets, bf16_sets=0)
            cands = linear_candidates(m, n, k, sms=sms, frag=frag)
        else:
            moe = shapes.moe
            sets = 16
            case = MoECase.build(m, weight_sets=2, route_sets=8, shape=moe, with_bf16=False)
            cands = moe_candidates(
                m, moe["experts"], moe["top_k"], hidden=moe["hidden"], inter=moe["inter"], sms=sms, frag=frag
            )
        key = _key((kind, shape, m), shapes)
        best, us, tried = tune_case(
            case, cands, sets=sets, calls=16 if m <= 128 else 4, budget=budget, log=log
        )
        if best is not None:
            table.setdefault(kind, {}).setdefault(key, {})[str(m)] = config_to_dict(best)
            log(f"{kind} {key} M={m}: {us:.1f} us, best of {tried}: {config_to_dict(best)}")
        del case
        torch.cuda.empty_cache()
    path = cache_path(card_slug(device), triton_version())
    write_cache(path, table)
    forget_tables()
    return table, str(path)


def _key(job: tuple, shapes: ModelShapes) -> str:
    """A job's shape key in the tables: 'NxK' for a linear, 'ExTOPKxHxI' for the MoE."""
    kind, shape, _ = job
    if kind == "linear":
        return f"{shape[0]}x{shape[1]}"
    moe = shapes.moe
    return f"{moe['experts']}x{moe['top_k']}x{moe['hidden']}x{moe['inter']}"


def write_cache(path, table: dict) -> None:
    """Merge `table` into the cache file at `path` (entries of the same shape and M are replaced)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    for kind, shapes in table.items():
        for key, entries in shapes.items():
            old.setdefault(kind, {}).setdefault(key, {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
