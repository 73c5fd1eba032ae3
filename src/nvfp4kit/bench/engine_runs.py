"""Timed runs of the engine for `nvfp4kit bench engine`: decode steps, prefill/TTFT, the decode roofline."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.engine.engine import Engine
from nvfp4kit.engine.request import Request
from nvfp4kit.plan.gpus import GPUS, GpuSpec
from nvfp4kit.plan.kv import kv_bytes_per_token
from nvfp4kit.plan.roofline import decode_step
from nvfp4kit.plan.weights import WeightBreakdown
from nvfp4kit.sampling import SamplingParams


def random_prompt(cfg: Gemma4TextConfig, length: int, *, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, cfg.vocab_size, (length,), generator=gen).tolist()


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


@dataclass(frozen=True)
class DecodeResult:
    batch: int
    context: int
    tokens_per_s: float
    ms_per_step: float
    gpu_ms_per_step: float | None = None  # device time of a step (forward + sampling), from CUDA events
    overlapped_steps: int = 0  # timed steps the overlap scheduler launched ahead of the host

    @property
    def host_ms_per_step(self) -> float | None:
        """Wall time per step the GPU spends waiting for the host (the overlap scheduler hides most of it)."""
        return None if self.gpu_ms_per_step is None else max(0.0, self.ms_per_step - self.gpu_ms_per_step)


# Gemma 4's generation_config: what a request that sets nothing samples with
GEMMA_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, top_k=64)


def start_batch(
    engine: Engine, *, batch: int, context: int, sampling: SamplingParams | None = None, seed: int = 0
) -> list[Request]:
    """`batch` requests of random `context`-token prompts, prefilled, each with at least one decode step run
    behind it: from here every `engine.step()` decodes all of them, until `end_batch`.

    The requests have no token limit: while later prompts prefill, the first ones already decode, for as many
    steps as the prefill takes (more with a small step budget), and a limit counted from the timed steps would
    end those early and shrink the batch under the timer (session 29: a batch-96 "decode" step in an engine of
    2,048-token steps ran 21 rows on average, so a faster step)."""
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    if sampling is not None:
        params = replace(sampling, max_tokens=None, ignore_eos=True)
    cfg = engine.model.config
    ids = [engine.add_request(random_prompt(cfg, context, seed=seed + b), params) for b in range(batch)]
    reqs = [engine.requests[i] for i in ids]
    while any(r.num_computed < len(r.prompt_ids) for r in reqs):
        engine.step()  # prefill, and the first token of each
    engine.step()  # one decode step more: every request is now decoding
    return reqs


def end_batch(engine: Engine, reqs: list[Request]) -> None:
    """Abort what `start_batch` began and run the engine dry (a step in flight drops their tokens)."""
    for req in reqs:
        engine.abort(req.request_id)
    while engine.has_unfinished():
        engine.step()


def check_whole_batch(reqs: list[Request], before: list[int], steps: int) -> None:
    """Raise unless every request decoded in each of the `steps` steps: a step of fewer rows is a faster step."""
    grown = {len(r.output_ids) - n for r, n in zip(reqs, before)}
    if grown != {steps} or any(r.preemptions or r.finish_reason for r in reqs):
        raise RuntimeError(
            f"the timed decode steps did not all run the whole batch of {len(reqs)} (tokens per request: "
            f"{sorted(grown)}, expected {steps}; preempted: {sum(1 for r in reqs if r.preemptions)}): "
            "give the engine more KV room (num_kv_tokens)"
        )


def decode_speed(
    engine: Engine,
    *,
    batch: int,
    context: int,
    steps: int,
    sampling: SamplingParams | None = None,
    overlap: bool | None = None,
) -> DecodeResult:
    """Aggregate tokens/s of `steps` decode steps of `batch` sequences whose prompts are `context` long
    (greedy, or with `sampling`'s temperature / top-p / top-k); `overlap`: the overlap scheduler on or off
    (None: the engine's setting). Every timed step decodes all `batch` sequences (checked)."""
    if batch > engine.config.max_num_seqs:  # the rest would wait, and tokens/s would count them as decoded
        raise ValueError(
            f"decode batch {batch} exceeds the engine's max_num_seqs={engine.config.max_num_seqs}"
        )
    if overlap is not None:
        engine.overlap = overlap
    reqs = start_batch(engine, batch=batch, context=context, sampling=sampling)
    _sync(engine)
    engine.collect_step_times(wait=True)
    device_before = _device_totals(engine)
    ahead = engine.overlapped_steps
    tokens_before = [len(r.output_ids) for r in reqs]
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine)
    seconds = time.perf_counter() - t0
    engine.collect_step_times(wait=True)
    device_steps, device_seconds = (a - b for a, b in zip(_device_totals(engine), device_before))
    ahead = engine.overlapped_steps - ahead
    check_whole_batch(reqs, tokens_before, steps)
    end_batch(engine, reqs)
    result = DecodeResult(batch, context, batch * steps / seconds, 1e3 * seconds / steps)
    gpu_ms = 1e3 * device_seconds / device_steps if device_steps else None
    return replace(result, gpu_ms_per_step=gpu_ms, overlapped_steps=ahead)


def _device_totals(engine: Engine) -> tuple[int, float]:
    """Decode steps the engine has device-timed so far, and their device seconds (StepStats)."""
    stats = engine.step_stats
    return sum(stats.device_steps.values()), sum(stats.device_seconds.values())


@dataclass(frozen=True)
class PrefillResult:
    prompt_len: int
    tokens_per_s: float
    ttft_ms: float  # from submission to the first generated token, an idle engine


def prefill_speed(engine: Engine, *, prompt_len: int, seed: int = 123, repeats: int = 3) -> PrefillResult:
    """One prompt prefilled `repeats` times on an idle engine (no prefix cache in `bench engine`); the median
    run, so that a one-off stall (a library's first call at a new shape) does not make the row."""
    prompt = random_prompt(engine.model.config, prompt_len, seed=seed)
    runs = []
    for _ in range(repeats):
        _sync(engine)
        t0 = time.perf_counter()
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        _sync(engine)
        runs.append(time.perf_counter() - t0)
    seconds = sorted(runs)[len(runs) // 2]
    return PrefillResult(prompt_len, prompt_len / seconds, 1e3 * seconds)


def card_spec(device: torch.device | str = "cuda") -> GpuSpec | None:
    """The planner's entry for this CUDA card (by name), or None when it is not listed."""
    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    matches = [gpu for gpu in GPUS if gpu.name.lower().replace(" ", "") in name]
    return max(matches, key=lambda g: len(g.name)) if matches else None


def decode_roofline(
    cfg: Gemma4TextConfig,
    weights: WeightBreakdown,
    *,
    batch: int,
    context: int,
    kv_dtype: str,
    bandwidth_bytes_per_s: float,
    fp8_lm_head: bool = False,
) -> tuple[float, float]:
    """(bytes one decode step must read, roofline tokens/s) for `batch` sequences at `context` tokens, with
    the head format in use."""
    kv = kv_bytes_per_token(cfg, kv_dtype=kv_dtype, k_eq_v_once=True)
    step = decode_step(
        cfg, weights, kv, batch=batch, context=context, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        fp8_lm_head=fp8_lm_head,
    )  # fmt: skip
    return step.bytes_per_step, step.tokens_per_s
