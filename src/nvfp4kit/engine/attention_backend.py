"""Attention backends: who does a `BatchContext`'s KV writes and attention.

- `torch`: the reference (`BatchContext.attend_reference`), per sequence, any device.
- `triton`: one KV-write launch and one or two attention launches per layer (decode items with key splits in
  `paged_attention`, prefill tiles in `prefill_attention`), over step metadata built once per step (`StepMetadata`).

`select_attention_backend(device, name)` picks `name` (`EngineConfig.attention_backend`, the
`--attention-backend` flag), else the `NVFP4KIT_ATTENTION_BACKEND` environment variable (all of them:
docs/architecture.md), else `triton` on CUDA (when Triton is installed) and `torch` elsewhere. The CPU can run the Triton
path only under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from nvfp4kit.model.ops import missing_package

if TYPE_CHECKING:
    from nvfp4kit.engine.batch_context import BatchContext

ENV_VAR = "NVFP4KIT_ATTENTION_BACKEND"
FUSED_KV_WRITE_VAR = "NVFP4KIT_FUSED_KV_WRITE"  # 0: K/V written by their own launch (for A/B timing)


def fused_kv_write_enabled() -> bool:
    return os.environ.get(FUSED_KV_WRITE_VAR, "1").strip().lower() not in ("0", "off", "false", "no")


class AttentionBackend(Protocol):
    name: str
    needs_metadata: bool  # whether the context should build `StepMetadata`

    def attend(
        self,
        ctx: BatchContext,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        """Store k/v [T, Hkv, D] of `layer` (None: it reads another layer's KV) and attend q [T, Hq, D]."""


class TorchAttentionBackend:
    name = "torch"
    needs_metadata = False

    def attend(self, ctx, layer, q, k, v, *, window):
        return ctx.attend_reference(layer, q, k, v, window=window)


class TritonAttentionBackend:
    name = "triton"
    needs_metadata = True

    def __init__(self):
        try:
            from nvfp4kit.kernels import (
                attention_launch,
                kv_write,
                paged_attention,
                prefill_attention,
                rotated_keys,
            )
        except ModuleNotFoundError as err:  # pragma: no cover - only where triton is missing
            if not missing_package(err, "triton"):
                raise
            raise RuntimeError(f"the triton attention backend needs Triton installed ({err})") from err
        self._write, self._kernels, self._prefill = kv_write, paged_attention, prefill_attention
        self._rotated, self._launch = rotated_keys, attention_launch
        self._derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def kv_sink(self, ctx, layer: int):
        """Where `layer`'s K/V rows go when the kernel computing them stores them too (`qkv_norm_rope`), or None
        when `attend` must write them: a sliding layer attended in several passes writes pass by pass."""
        if not fused_kv_write_enabled():
            return None
        cache, sliding = ctx.cache, ctx.cfg.is_sliding(layer)
        if sliding and len(ctx.sliding_metadata()) > 1:
            return None
        meta = ctx.metadata
        return self._write.KVSink(
            slots=meta.ring_slots if sliding else meta.global_slots, v_store=cache.values[layer],
            k_store=cache.keys[layer], v_scale=cache.scale(layer, 1), k_scale=cache.scale(layer, 0),
        )  # fmt: skip

    def attend(self, ctx, layer, q, k, v, *, window):
        sliding = ctx.cfg.is_sliding(layer)
        out = torch.zeros_like(q) if ctx.metadata.padded_rows else torch.empty_like(q)
        # sliding layers: a pass writes its tokens, then attends; a step with more tokens of one sequence than the
        # ring leaves room for runs several passes, in order (BatchContext.sliding_metadata)
        for meta in ctx.sliding_metadata() if sliding else [ctx.metadata]:
            self._attend_pass(ctx, meta, layer, q, k, v, window=window, out=out)
        return out

    def _attend_pass(self, ctx, meta, layer, q, k, v, *, window, out):
        cfg, cache = ctx.cfg, ctx.cache
        kernels = self._kernels
        src = cfg.kv_source_layer(layer)
        sliding = cfg.is_sliding(layer)
        k_store, v_store = cache.keys[src], cache.values[src]
        k_scale, v_scale = cache.scale(src, 0), cache.scale(src, 1)
        if k is not None:
            self._write.write_kv(
                v, k=None if k_store is None else k, slots=meta.ring_slots if sliding else meta.global_slots,
                v_store=v_store, k_store=k_store, v_scale=v_scale, k_scale=k_scale,
            )  # fmt: skip
        derived = None if k_store is not None else self._derived_key(ctx.model.layers[src].self_attn)
        where = {"ring_size": cache.layout.ring_size} if sliding else {"block_size": cache.layout.block_size}
        common = dict(
            v_store=v_store, k_store=k_store, batch=meta.batch, window=window, v_scale=v_scale, k_scale=k_scale,
            derived_key=derived, **where,
        )  # fmt: skip
        kv_heads, head_dim = v_store.shape[1], v_store.shape[2]
        decode = meta.decode_items()
        if decode is not None:
            splits = self._launch.choose_num_splits(
                len(decode), kv_heads, meta.max_decode_keys(window), device=q.device, head_dim=head_dim,
                group=q.shape[1] // kv_heads, fp8=v_store.element_size() == 1,
            )  # fmt: skip
            kernels.paged_attention(q, items=decode, num_splits=splits, out=out, **common)
        prefill = meta.prefill_items(self._prefill.prefill_block_q(head_dim, q.shape[1] // kv_heads))
        if prefill is not None:
            limit = meta.key_limit if sliding else None  # global layers stay causal for image tokens too
            rotated = None
            if derived is not None and not sliding:
                rotated = self._prerotated_keys(meta, q, v_store, derived, cache.layout)
            self._prefill.prefill_attention(
                q, items=prefill, out=out, key_limit=limit, rotated_keys=rotated, **common
            )

    def _prerotated_keys(self, meta, q, v_store, derived, layout):
        """Derived K's rotated columns computed once for the step's prefill sequences, when they have enough keys
        to repay it and fit the layout's scratch budget (`rotated_keys.worth_prerotating`); None keeps the
        in-kernel derivation, always inside a CUDA graph capture (the scratch's size follows the step)."""
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        first_row, total, most = meta.prefill_key_rows()
        if not self._rotated.worth_prerotating(q, v_store, derived, total, layout.rotated_keys_budget):
            return None
        return self._rotated.rotate_derived_keys(
            q, v_store, derived, meta.batch, block_size=layout.block_size, first_row=first_row, total_rows=total,
            max_keys=most,
        )  # fmt: skip

    def _derived_key(self, attn: torch.nn.Module):
        """k_norm weight and RoPE frequencies of a k_eq_v layer; the count of rotated pairs is read once."""
        if attn not in self._derived:
            inv_freq = attn.inv_freq.float()
            pairs = int((inv_freq != 0).nonzero().max()) + 1 if bool((inv_freq != 0).any()) else 0
            self._derived[attn] = self._kernels.DerivedKey(attn.k_norm.weight, inv_freq, pairs)
        return self._derived[attn]


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "triton": TritonAttentionBackend,
}
_INSTANCES: dict[str, AttentionBackend] = {}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def available_attention_backends() -> list[str]:
    return sorted(_FACTORIES)


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as err:  # pragma: no cover
        if not missing_package(err, "triton"):
            raise
        return False
    return True


def select_attention_backend(device: torch.device | str, name: str | None = None) -> AttentionBackend:
    """`name`, else $NVFP4KIT_ATTENTION_BACKEND, else `triton` on CUDA and `torch` elsewhere."""
    device = torch.device(device)
    name = name or os.environ.get(ENV_VAR) or None
    if name is None:
        name = "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_attention_backends()}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]
