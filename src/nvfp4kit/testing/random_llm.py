"""`RandomLLM`: an `LLM` whose model has random NVFP4 weights of a preset's shape, built on the device.

`nvfp4kit serve --random-weights gemma-4-26b-a4b` serves one, so the server can be measured at the real
26B-A4B shape with no download (`nvfp4kit bench serve` against it): the weights come from
`testing.random_model` (as `nvfp4kit bench engine` builds them), every route works, the speeds are the shape's
and the text is nonsense. The folder the server reads (config, generation config, chat template, tokenizer) is
written to a temporary directory: the tokenizer is the byte-level test tokenizer (Gemma 4's control tokens at
their ids) padded with `<unusedN>` tokens to the model's vocabulary, so every sampled id decodes to text.
With `tensor_parallel_size=N` every rank builds the same seeded model and keeps its cut (`random_shard`), so TP 1
and TP N serve the same weights.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path

import torch

from nvfp4kit.config import PRESET_DIR, Gemma4TextConfig, config_from_dict, list_presets
from nvfp4kit.engine.engine import EngineConfig, resolve_kv_dtype
from nvfp4kit.engine.linear_copies import keep_linear_copies, linear_copies_to_keep
from nvfp4kit.engine.sizing import measure_device_memory, plan_engine_memory
from nvfp4kit.engine.startup import check_device, memory_options, prepare_kernel_tables
from nvfp4kit.llm import LLM
from nvfp4kit.model.loader import resolve_dtype
from nvfp4kit.plan.parallel import ParallelLayout
from nvfp4kit.plan.weights import linear_copy_bytes, weights_from_config
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny import write_tokenizer
from nvfp4kit.testing.tiny_config import SHAPES, tiny_text_config
from nvfp4kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GENERATION_CONFIG = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50], "do_sample": True,
                     "temperature": 1.0, "top_p": 0.95, "top_k": 64}  # fmt: skip


def random_shapes() -> list[str]:
    """Names `--random-weights` takes: the presets (`gemma-4-26b-a4b`, also `26b-a4b`) and `tiny-moe` etc."""
    return [*list_presets(), *(f"tiny-{s}" for s in sorted(SHAPES))]


def random_shape_config(name: str) -> tuple[str, dict, dict]:
    """(canonical name, text config dict, generation config) of a preset or a tiny test shape."""
    if name.startswith("tiny-") and name[5:] in SHAPES:
        return name, tiny_text_config(name[5:]), dict(GENERATION_CONFIG)
    for candidate in (name, f"gemma-4-{name}"):
        file = PRESET_DIR / f"{candidate}.json"
        if file.is_file():
            raw = json.loads(file.read_text())
            text = raw["config"].get("text_config") or raw["config"]
            return candidate, dict(text), raw.get("generation_config") or dict(GENERATION_CONFIG)
    raise ValueError(f"unknown shape {name!r} for random weights; known: {', '.join(random_shapes())}")


def write_random_folder(name: str, folder: str | Path) -> Gemma4TextConfig:
    """Write what a server reads besides the weights (config, generation config, tokenizer, chat template)."""
    _, text, generation = random_shape_config(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = {**text, "model_type": "gemma4_text"}
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["Gemma4ForCausalLM"], **text}, indent=1)
    )
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))
    write_tokenizer(folder, text["vocab_size"])
    return config_from_dict(text, generation_config=generation)


class RandomLLM(LLM):
    """`LLM` with random all-NVFP4 weights of `shape` (a preset name or `tiny-moe`, `tiny-dense`, `tiny-e2b`).

    Takes `LLM`'s engine, memory and kernel-table keywords and `tensor_parallel_size`; on a GPU the KV cache is
    planned as for a checkpoint, from the planner's weight bytes for the shape (the busiest rank's under TP)."""

    def __init__(
        self,
        shape: str = "gemma-4-26b-a4b",
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        engine_config: EngineConfig | None = None,
        gpu_memory_utilization: float | None = None,
        gpu_memory_budget: int | str | None = None,
        kv_cache_memory: int | str | None = None,
        fp8_lm_head: bool = False,
        tune: bool = False,
        seed: int | None = None,
        weights_seed: int = 0,
        tensor_parallel_size: int = 1,
        linear_copies: str | bool = "auto",
        kernel_cache_dir: str | Path | None = None,
    ):
        self.shape, _, _ = random_shape_config(shape)
        self.path = Path(tempfile.mkdtemp(prefix=f"nvfp4kit-random-{self.shape}-"))
        self._remove_folder = weakref.finalize(self, shutil.rmtree, str(self.path), True)  # also at exit
        self.engine = self.model = self.parallel = None  # close() works from here on
        cfg = write_random_folder(self.shape, self.path)
        self.device = torch.device(device)
        check_device(self.device)
        self.seed = seed
        self._request_counter = 0
        engine_config, options = memory_options(
            engine_config or EngineConfig(), device=self.device, gpu_memory_utilization=gpu_memory_utilization,
            gpu_memory_budget=gpu_memory_budget, kv_cache_memory=kv_cache_memory,
        )  # fmt: skip
        model_dtype = resolve_dtype(dtype, self.device)
        layout = None
        weights = weights_from_config(cfg, recipe="all-nvfp4").text_bytes
        vocab_rows = cfg.vocab_size
        if tensor_parallel_size > 1:
            layout = ParallelLayout(cfg, tensor_parallel_size).check(nvfp4=True)
            local = weights_from_config(layout.local_config(), recipe="all-nvfp4")
            weights = layout.busiest_rank_weights(weights_from_config(cfg, recipe="all-nvfp4"), local)
            vocab_rows = len(layout.vocab_range(0))
        extra = vocab_rows * (cfg.hidden_size + 4) if fp8_lm_head else 0
        copies = linear_copies_to_keep(
            linear_copies, device=self.device, copy_bytes=linear_copy_bytes(cfg), model_dtype=model_dtype,
            tensor_parallel_size=tensor_parallel_size, card_bytes=options.gpu_memory_budget,
        )  # fmt: skip
        self.linear_copies = copies > 0
        extra += copies
        self.startup_plan = plan_engine_memory(
            layout.local_config() if layout else cfg,
            weights_bytes=weights + extra,
            memory=measure_device_memory(self.device),
            options=options,
            config=engine_config,
            kv_dtype=resolve_kv_dtype(engine_config.kv_dtype, model_dtype=model_dtype),
        )
        if self.startup_plan is not None:
            log.info("%s", self.startup_plan.format())
            engine_config = replace(engine_config, kv_cache_memory=self.startup_plan.kv_cache_memory)
        prepare_kernel_tables(lambda: cfg, kernel_cache_dir=kernel_cache_dir, tune=tune, device=self.device)
        log.info("building random NVFP4 weights of %s on %s", self.shape, self.device)
        if layout is not None:  # rank 0 here, ranks 1.. spawned; each builds the model and keeps its cut
            from nvfp4kit.distributed.group import TensorParallelGroup

            self.parallel = TensorParallelGroup.start(
                self.path, tensor_parallel_size, dtype=model_dtype, device=self.device, quantized=True,
                loader=functools.partial(random_shard, seed=weights_seed),
            )  # fmt: skip
            self.model = self.parallel.model
        else:
            self.model = random_model(
                cfg, quantized=True, dtype=model_dtype, device=self.device, seed=weights_seed
            )
        if self.linear_copies:
            keep_linear_copies(self.model)
        if fp8_lm_head:
            self.model.use_fp8_lm_head()
        self.config = cfg
        self.tokenizer = Tokenizer(self.path)
        self.generation_config = json.loads((self.path / "generation_config.json").read_text())
        self._start_engine(engine_config)

    def close(self) -> None:
        """Release the engine and weights (as `LLM.close`) and delete the temporary folder."""
        super().close()
        if "_remove_folder" in self.__dict__:
            self._remove_folder()


def random_shard(
    path,
    layout: ParallelLayout,
    rank: int,
    *,
    dtype,
    device,
    backend=None,
    quantized: bool = True,
    seed: int = 0,
):
    """One rank's cut of the random model `random_model` builds with `seed` (the same weights as at TP 1)."""
    from nvfp4kit.distributed.slicing import shard_model

    full = random_model(
        layout.cfg, quantized=quantized, dtype=dtype, device=device, backend=backend, seed=seed
    )
    shard = shard_model(full, layout, rank)
    del full
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return shard
