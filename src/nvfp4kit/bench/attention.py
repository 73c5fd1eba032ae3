"""`nvfp4kit bench attention`: prefill attention at the model's layer shapes on a CUDA GPU.

For each layer kind of the preset (sliding: ring storage and window; global: paged pool, K derived from the
stored V for k_eq_v layers) and each prompt length, the attention of the whole prompt prefilled in chunks is
timed: the first, second and last chunk are timed and the others interpolated (a global chunk's cost grows
linearly with its position, a sliding chunk's is constant once past the window), so a 128K prompt costs three
launches, not 64. TFLOP/s counts the causal (and windowed) score and output products, 4 * D flops per query-key
pair. Kernels: `prefill` (kernels/prefill_attention.py, its default tiles or `--sweep` over candidates),
`paged` (the decode-shaped kernel in kernels/paged_attention.py run on prefill tiles, the earlier path), and
torch's `scaled_dot_product_attention` on contiguous BF16 (whole prompt, causal, no window) where a torch backend
takes the head dim. Every candidate's output is compared with the `paged` kernel's on the timed chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nvfp4kit.config import Gemma4TextConfig, load_config, load_preset

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class LayerPool:
    """One layer's KV for one sequence of `length` tokens, random values, in the engine's storage layout."""

    def __init__(
        self, cfg: Gemma4TextConfig, layer: int, length: int, chunk: int, kv_dtype: torch.dtype, *,
        device: torch.device, block_size: int = 16,
    ):  # fmt: skip
        from nvfp4kit.kernels.paged_attention import DerivedKey
        from nvfp4kit.model.layers import rope_inv_freq

        self.device = device
        gen = torch.Generator(device=device).manual_seed(layer)
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window if self.sliding else None
        self.kv_heads, self.head_dim = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
        self.q_heads = cfg.num_attention_heads
        self.ring_size = cfg.sliding_window + chunk if self.sliding else None
        self.block_size = block_size
        blocks = -(-length // block_size)
        rows = self.ring_size if self.sliding else blocks * block_size
        self.table = torch.randperm(blocks, device=device, generator=gen).int().view(1, -1)

        def store() -> torch.Tensor:
            x = torch.randn(rows, self.kv_heads, self.head_dim, device=device, generator=gen) * 0.5
            return x.to(kv_dtype)

        self.v_store = store()
        derive = not self.sliding and cfg.attention_k_eq_v
        self.k_store = None if derive else store()
        self.derived = None
        if derive:
            inv_freq = rope_inv_freq(cfg.layer_rope(layer), self.head_dim).to(device)
            weight = torch.rand(self.head_dim, device=device, generator=gen) + 0.5
            self.derived = DerivedKey(weight, inv_freq, int((inv_freq != 0).sum()))

    def flops(self, start: int, n: int) -> float:
        keys = torch.arange(start + 1, start + n + 1, dtype=torch.float64)
        if self.window:
            keys = keys.clamp(max=self.window)
        return 4.0 * self.head_dim * self.q_heads * float(keys.sum())

    def call(self, kernel: str, start: int, n: int, config=None):
        """A no-argument launch of `kernel` for the chunk of n queries at `start` (metadata built outside)."""
        from nvfp4kit.kernels.attention_launch import paged_prefill_block_q
        from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
        from nvfp4kit.kernels.configs import kernel_capability
        from nvfp4kit.kernels.paged_attention import paged_attention
        from nvfp4kit.kernels.prefill_attention import prefill_attention, prefill_config

        group = self.q_heads // self.kv_heads
        if kernel == "paged":
            block_q, fn, extra = paged_prefill_block_q(self.head_dim, group), paged_attention, {}
        else:
            config = config or prefill_config(self.head_dim, group, kernel_capability(self.device))
            block_q, fn, extra = config.block_q, prefill_attention, {"config": config}
        ints = torch.tensor([[start], [n], [0], [0]], dtype=torch.int32, device=self.device)
        batch = AttentionBatch(ints[0], ints[1], ints[2], self.table, ints[3])
        q0 = torch.arange(0, n, block_q, dtype=torch.int32, device=self.device)
        items = WorkItems(torch.zeros_like(q0), q0, block_q)
        gen = torch.Generator(device=self.device).manual_seed(start)
        q = torch.randn(n, self.q_heads, self.head_dim, device=self.device, generator=gen).to(self.dtype)
        out = torch.empty_like(q)
        where = {"ring_size": self.ring_size} if self.sliding else {"block_size": self.block_size}
        kwargs = dict(v_store=self.v_store, k_store=self.k_store, batch=batch, items=items, window=self.window,
                      derived_key=self.derived, out=out, **where, **extra)  # fmt: skip
        return lambda: fn(q, **kwargs)

    @property
    def dtype(self) -> torch.dtype:  # the engine's activations: bf16 on GPUs, fp32 in the CPU interpreter
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def _time_ms(fn, reps: int = 5) -> float:
    """Median ms of `reps` calls after a warm-up (CUDA events; wall clock on the CPU)."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0
    from nvfp4kit.tuning.timing import time_eager

    return time_eager(lambda _: fn(), sets=1, calls=1, repeats=reps) / 1000.0


def prompt_time(pool: LayerPool, kernel: str, length: int, chunk: int, config=None) -> tuple[float, float]:
    """(ms for the whole prompt's attention, max relative error of the timed chunks against `paged`)."""
    starts = list(range(0, length, chunk))
    timed = sorted({0, starts[min(1, len(starts) - 1)], starts[-1]})
    ms, err = {}, 0.0
    for s in timed:
        n = min(chunk, length - s)
        fn = pool.call(kernel, s, n, config)
        ms[s] = _time_ms(fn)
        if kernel != "paged":
            ref = pool.call("paged", s, n)()
            got = fn()
            err = max(err, float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)))
    if len(starts) <= 3:
        return sum(ms.values()), err
    middle = len(starts) - 2  # chunks 1 .. n-1 by the trapezoid between the second and the last
    return ms[0] + middle * (ms[starts[1]] + ms[starts[-1]]) / 2 + ms[starts[-1]], err


def sdpa_ms(pool: LayerPool, length: int) -> float | None:
    """Causal SDPA over the whole prompt, contiguous BF16, flash backend (None where it refuses the head dim)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (1, pool.q_heads, length, pool.head_dim)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, pool.kv_heads, length, pool.head_dim, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return _time_ms(
                lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True), 3
            )
    except RuntimeError as err:
        _log(f"  sdpa refused head_dim {pool.head_dim}: {str(err).splitlines()[0][:100]}")
        return None


def candidates(head_dim: int, group: int):
    """Tiles to sweep, around the defaults (`prefill_configs`)."""
    from nvfp4kit.kernels.prefill_attention import PrefillConfig, prefill_block_q

    block_q = prefill_block_q(head_dim, group)
    if head_dim >= 512:  # (keys, column slices, warps, stages)
        grid = [(64, 1, 8, 2), (64, 1, 8, 3), (32, 1, 8, 2), (64, 2, 8, 2), (128, 1, 8, 1), (128, 2, 8, 2)]
    else:
        grid = [(64, 1, 8, 2), (64, 1, 8, 3), (128, 1, 8, 2), (32, 1, 4, 2)]
    for bn, dv, warps, stages in grid:
        yield PrefillConfig(block_q, bn, dv, warps, stages)


def _config(preset: str) -> Gemma4TextConfig:
    return load_config(preset) if Path(preset).exists() else load_preset(preset)


def run_attention(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "bench attention needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1, tiny shapes)"
        )
    cfg = _config(args.preset)
    kinds = {"sliding": next(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)),
             "global": next(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))}  # fmt: skip
    rows = []
    for kind, layer in kinds.items():
        longest = max(args.prompts)
        pool = LayerPool(cfg, layer, longest, args.chunk, KV_DTYPES[args.kv_dtype], device=device)
        best = None
        if args.sweep:
            sweep_len = min(longest, 16384)
            for c in candidates(pool.head_dim, pool.q_heads // pool.kv_heads):
                try:
                    ms, err = prompt_time(pool, "prefill", sweep_len, args.chunk, c)
                except Exception as exc:  # a tile that does not compile or fit: skip it, say so
                    _log(f"  {kind} {c}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                    continue
                tflops = sum(
                    pool.flops(s, min(args.chunk, sweep_len - s)) for s in range(0, sweep_len, args.chunk)
                )
                _log(f"  {kind} {c}: {ms:.2f} ms ({tflops / ms / 1e9:.0f} TFLOP/s) err {err:.1e}")
                if err < 2e-2 and (best is None or ms < best[0]):
                    best = (ms, c)
            _log(f"best {kind} at {sweep_len}: {best}")
        for length in args.prompts:
            flops = sum(pool.flops(s, min(args.chunk, length - s)) for s in range(0, length, args.chunk))
            for kernel in ("paged", "prefill"):
                config = best[1] if best and kernel == "prefill" else None
                ms, err = prompt_time(pool, kernel, length, args.chunk, config)
                rows.append({"layer": kind, "prompt_len": length, "chunk": args.chunk, "kernel": kernel,
                             "config": str(config) if config else "default", "ms": round(ms, 3),
                             "tflops": round(flops / ms / 1e9, 1), "rel_err_vs_paged": err})  # fmt: skip
            base = sdpa_ms(pool, length) if args.sdpa and device.type == "cuda" else None
            if base is not None:
                causal = 4.0 * pool.head_dim * pool.q_heads * length * (length + 1) / 2
                rows.append({"layer": kind, "prompt_len": length, "chunk": length, "kernel": "sdpa_flash_bf16",
                             "config": "whole prompt, no window", "ms": round(base, 3),
                             "tflops": round(causal / base / 1e9, 1), "rel_err_vs_paged": None})  # fmt: skip
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{card}, {args.preset}, KV {args.kv_dtype}, chunk {args.chunk}")
    print(f"{'layer':8} {'prompt':>7} {'kernel':16} {'ms':>9} {'TFLOP/s':>8} {'err':>8}")
    for r in rows:
        err = "" if r["rel_err_vs_paged"] is None else f"{r['rel_err_vs_paged']:.1e}"
        print(
            f"{r['layer']:8} {r['prompt_len']:>7} {r['kernel']:16} {r['ms']:>9.2f} {r['tflops']:>8.1f} {err:>8}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"card": card, "preset": args.preset, "kv_dtype": args.kv_dtype, "rows": rows}, f, indent=1
            )
    return 0


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser("attention", help="prefill attention per layer kind at long prompts (CUDA)")
    p.add_argument(
        "--preset", default="gemma-4-26b-a4b", help="model shape: a preset or a config folder (%(default)s)"
    )
    p.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (a smoke test)")
    p.add_argument("--prompts", type=int, nargs="+", default=[8192, 32768, 131072], help="prompt lengths")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (default: %(default)s)")
    p.add_argument("--kv-dtype", default="fp8", choices=sorted(KV_DTYPES), help="KV pool dtype")
    p.add_argument("--sweep", action="store_true", help="time candidate tiles first; use the fastest")
    p.add_argument("--no-sdpa", dest="sdpa", action="store_false", help="skip the torch SDPA baseline")
    p.add_argument("--json", help="write the rows here")
    p.set_defaults(func=run_attention)
