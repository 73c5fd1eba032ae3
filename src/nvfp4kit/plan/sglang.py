"""How the seed's stack (SGLang, hybrid sliding-window pool) sizes its KV cache, so the plan can show it.

SGLang measures free GPU memory before loading weights (`pre_load_free`), loads them, and gives the KV pool
what is left after holding back `pre_load_free * (1 - mem_fraction_static)` for everything else:

    kv_bytes    = pre_load_free * mem_fraction_static - weights [- 0.1 GiB multimodal cache, SGLang >= 0.5.23]
    full_tokens = kv_bytes // (F + r * S)          F, S = per-token KV bytes of all full / all sliding layers
    swa_tokens  = int(full_tokens * r)             r = --swa-full-tokens-ratio (default 0.8)

(sglang 0.5.11 `model_executor/pool_configurator.py`, 0.5.23 `mem_cache/kv_cache_configurator.py`; GiB
everywhere in its logs.) K and V are stored separately, also for `attention_k_eq_v` layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.plan.kv import kv_bytes_per_token

SEED_MEM_FRACTION = 0.91
SEED_SWA_RATIO = 0.05
SGLANG_DEFAULT_SWA_RATIO = 0.8
SWA_EVICTION_INTERVAL = (
    128  # SGLANG_SWA_EVICTION_INTERVAL: out-of-window KV is freed in steps of this many tokens
)


@dataclass(frozen=True)
class SGLangPools:
    pre_load_free_bytes: int
    weights_bytes: int
    mem_fraction_static: float
    swa_full_tokens_ratio: float
    kv_bytes: int
    full_tokens: int
    swa_tokens: int
    full_bytes_per_token: int  # F: all full layers
    swa_bytes_per_token: int  # S: all sliding layers
    window: int

    @property
    def fits(self) -> bool:
        """SGLang refuses to start unless the SWA pool holds more than one window (+ a page)."""
        return self.kv_bytes > 0 and self.swa_tokens > self.window + 1

    @property
    def runtime_reserve_bytes(self) -> int:
        """What SGLang leaves outside weights + KV for activations, CUDA graphs, logits."""
        return int(self.pre_load_free_bytes * (1 - self.mem_fraction_static))

    def requests_at(self, context: int) -> int:
        """Requests of `context` tokens that fit both pools at once (each pins about a window of SWA KV)."""
        if not self.fits or context <= 0:
            return 0
        swa_pin = min(context, self.window + SWA_EVICTION_INTERVAL)
        return max(0, min(self.full_tokens // context, self.swa_tokens // swa_pin))


def sglang_pools(
    *,
    weights_bytes: int,
    pre_load_free_bytes: int,
    full_bytes_per_token: int,
    swa_bytes_per_token: int,
    window: int,
    mem_fraction_static: float = SEED_MEM_FRACTION,
    swa_full_tokens_ratio: float = SGLANG_DEFAULT_SWA_RATIO,
    mm_reserve_bytes: int = 0,
) -> SGLangPools:
    """SGLang's two pool sizes for a checkpoint of `weights_bytes` on a GPU with `pre_load_free_bytes` free."""
    if not 0 < mem_fraction_static <= 1:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {mem_fraction_static}")
    if not 0 < swa_full_tokens_ratio <= 1:
        raise ValueError(f"--swa-full-tokens-ratio must be in (0, 1], got {swa_full_tokens_ratio}")
    kv = int(pre_load_free_bytes * mem_fraction_static) - weights_bytes - mm_reserve_bytes
    cell = full_bytes_per_token + swa_full_tokens_ratio * swa_bytes_per_token
    full = int(max(kv, 0) // cell) if cell else 0
    swa = int(full * swa_full_tokens_ratio)
    return SGLangPools(
        pre_load_free_bytes, weights_bytes, mem_fraction_static, swa_full_tokens_ratio, kv, full, swa,
        full_bytes_per_token, swa_bytes_per_token, window,
    )  # fmt: skip


def sglang_pools_for(
    cfg: Gemma4TextConfig,
    *,
    weights_bytes: int,
    pre_load_free_bytes: int,
    kv_dtype: str = "fp8_e5m2",
    mem_fraction_static: float = SEED_MEM_FRACTION,
    swa_full_tokens_ratio: float = SGLANG_DEFAULT_SWA_RATIO,
    mm_reserve_bytes: int = 0,
) -> SGLangPools:
    per_token = kv_bytes_per_token(cfg, kv_dtype=kv_dtype, k_eq_v_once=False)
    return sglang_pools(
        weights_bytes=weights_bytes,
        pre_load_free_bytes=pre_load_free_bytes,
        full_bytes_per_token=per_token.full,
        swa_bytes_per_token=per_token.sliding,
        window=cfg.sliding_window,
        mem_fraction_static=mem_fraction_static,
        swa_full_tokens_ratio=swa_full_tokens_ratio,
        mm_reserve_bytes=mm_reserve_bytes,
    )


def tokens_per_fraction_step(pools: SGLangPools, *, step: float = 0.01) -> int:
    """Full-pool tokens gained by raising --mem-fraction-static by `step` (weights unchanged)."""
    cell = pools.full_bytes_per_token + pools.swa_full_tokens_ratio * pools.swa_bytes_per_token
    return int(step * pools.pre_load_free_bytes / cell)
