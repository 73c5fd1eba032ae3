"""`LLM`: load a checkpoint and generate with the batching engine (`nvfp4kit.engine`).

`generate` runs a list of prompts together (continuous batching, chunked prefill); `stream` yields one
event per generated token of one request. On a GPU the KV cache is sized before loading, from the
checkpoint's headers, the measured memory and the memory options (`nvfp4kit.engine.sizing`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.linear_copies import keep_cpu_copies, keep_linear_copies, linear_copies_to_keep
from nvfp4kit.engine.outputs import RequestOutput
from nvfp4kit.engine.request import TokenEvent
from nvfp4kit.engine.sizing import plan_checkpoint_memory
from nvfp4kit.engine.startup import check_device, memory_options, prepare_kernel_tables
from nvfp4kit.engine.warmup import warmup_wanted
from nvfp4kit.model.loader import load_model, resolve_dtype
from nvfp4kit.plan.checkpoint import linear_copy_bytes_from_checkpoint
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.openai_parts import ImagePartError, extract_images
from nvfp4kit.vision.prompts import ImagePrompts, encode_prompt

if TYPE_CHECKING:
    from nvfp4kit.prompting.chat_template import ChatTemplate

log = logging.getLogger(__name__)


class LLM:
    """`LLM(path, dtype=..., device=...)`; `llm.generate(prompts, SamplingParams(...))`.

    Memory (as vLLM's options): `gpu_memory_utilization` (fraction of the GPU's total memory the engine may
    use, default 0.90), `gpu_memory_budget` (act as if the GPU had this much, e.g. "24GiB"; replaces the
    utilization) or `kv_cache_memory` (the KV bytes themselves). On a GPU the KV cache is planned from these
    before any weight is loaded, and a model that cannot fit raises `InsufficientMemoryError` at once.
    `fp8_lm_head`: compute logits from an FP8 copy of the output projection (faster decode, slightly
    different logits; see docs/benchmarks.md). `linear_copies` ("auto", "on", "off"): BF16 copies of the
    attention and dense-MLP weights for steps of many tokens (`engine.linear_copies`; auto: on large cards).

    vLLM-shaped too: `LLM()` loads the built-in demo; `enforce_eager`, `max_num_seqs`, `max_num_batched_tokens`,
    `kv_cache_dtype` set the engine, `seed` makes requests without their own seed reproducible;
    `generate(prompts, sampling_params=..., use_tqdm=...)`, `chat(messages, ...)`, `get_tokenizer()`.
    `tune` times the kernels' missing table entries on the card before loading; `kernel_cache_dir` is where
    the tuning tables are kept and read, for the whole process (else $NVFP4KIT_CACHE_DIR, else ~/.cache).
    `tensor_parallel_size=N` splits the model over N devices, one process each, this one running the engine
    (heads, MLP columns, experts and vocab rows; no CUDA graphs or images yet; docs/parallel.md).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        backend: str | None = None,
        max_model_len: int | None = None,
        engine_config: EngineConfig | None = None,
        gpu_memory_utilization: float | None = None,
        gpu_memory_budget: int | str | None = None,
        kv_cache_memory: int | str | None = None,
        fp8_lm_head: bool = False,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        kv_cache_dtype: str | None = None,
        seed: int | None = None,
        tune: bool = False,
        language_model_only: bool = False,
        kernel_cache_dir: str | Path | None = None,
        tensor_parallel_size: int = 1,
        linear_copies: str | bool = "auto",
    ):
        if model is None:  # as the CLI: the built-in NVFP4 demo model
            from nvfp4kit.demo import demo_model_path

            model = demo_model_path("nvfp4")
        self.path = Path(model)
        self.device = torch.device(device)
        check_device(self.device)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such model folder")
        self.language_model_only = (
            language_model_only  # text only: the vision tower neither planned nor loaded
        )
        self.seed = seed  # requests without their own seed get seed, seed + 1, ... (reproducible runs)
        self._request_counter = 0
        engine_config = _engine_options(
            engine_config or EngineConfig(),
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_dtype=kv_cache_dtype,
            tensor_parallel_size=tensor_parallel_size,
        )
        if max_model_len is not None:
            engine_config = replace(engine_config, max_model_len=max_model_len)
        engine_config, options = memory_options(
            engine_config, device=self.device, gpu_memory_utilization=gpu_memory_utilization,
            gpu_memory_budget=gpu_memory_budget, kv_cache_memory=kv_cache_memory,
        )  # fmt: skip
        model_dtype = resolve_dtype(dtype, self.device)
        copies = linear_copies_to_keep(
            linear_copies, device=self.device, copy_bytes=linear_copy_bytes_from_checkpoint(self.path),
            model_dtype=model_dtype, tensor_parallel_size=tensor_parallel_size, card_bytes=options.gpu_memory_budget,
        )  # fmt: skip
        self.linear_copies = copies > 0
        if tensor_parallel_size > 1:  # rank 0 here, ranks 1.. in spawned processes (docs/parallel.md)
            from nvfp4kit.distributed.memory import plan_parallel_memory

            self.startup_plan = plan_parallel_memory(
                self.path, tensor_parallel_size, device=self.device, model_dtype=model_dtype,
                config=engine_config, options=options, fp8_lm_head=fp8_lm_head,
            )  # fmt: skip
        else:
            self.startup_plan = plan_checkpoint_memory(
                self.path, device=self.device, model_dtype=model_dtype, config=engine_config, options=options,
                fp8_lm_head=fp8_lm_head, vision=not language_model_only,
                copies_bytes=copies,
            )  # fmt: skip
        if self.startup_plan is not None:
            log.info("%s", self.startup_plan.format())
            engine_config = replace(engine_config, kv_cache_memory=self.startup_plan.kv_cache_memory)
        from nvfp4kit.config import load_config

        prepare_kernel_tables(
            lambda: load_config(self.path), kernel_cache_dir=kernel_cache_dir, tune=tune, device=self.device
        )
        self.parallel = None  # the tensor-parallel group (nvfp4kit.distributed.group), when there is one
        if tensor_parallel_size > 1:
            from nvfp4kit.distributed.group import TensorParallelGroup

            self.parallel = TensorParallelGroup.start(
                self.path, tensor_parallel_size, dtype=model_dtype, device=self.device, backend=backend
            )
            self.model = self.parallel.model  # rank 0's shard; its forwards run on every rank
        else:
            self.model = load_model(self.path, dtype=model_dtype, device=self.device, backend=backend)
            if self.device.type == "cpu":
                keep_cpu_copies(self.model)
            elif self.linear_copies:
                keep_linear_copies(self.model)
        if fp8_lm_head:
            self.model.use_fp8_lm_head()
        self.config = self.parallel.layout.cfg if self.parallel else self.model.config
        self.tokenizer = Tokenizer(self.path)
        gen_file = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        self._start_engine(engine_config)

    def _start_engine(self, engine_config: EngineConfig) -> None:
        """`self.engine` over `self.model`; under tensor parallel, the workers' KV caches, then every rank's decode
        graphs (collectives inside, distributed/graphs.py), then the warm-up, whose forwards run on every rank."""
        warm_up = warmup_wanted(engine_config.warmup, self.device)
        if self.parallel is not None:
            engine_config = replace(engine_config, warmup=False)
        self.engine = Engine(
            self.model, self.tokenizer, config=engine_config, generation_config=self.generation_config
        )
        if self.parallel is not None:
            self.parallel.attach(self.engine)  # the workers' KV caches, laid out as this engine's
            self.engine.capture_decode_graphs()
            if warm_up:
                self.engine.warm_up()
        self.max_model_len = self.engine.max_model_len

    def close(self) -> None:
        """Release the engine, its KV cache and CUDA graphs, and the weights; on a GPU the memory goes back to
        the driver, so another `LLM` can start in this process. Also run by `with LLM(...)` and on deletion."""
        engine, self.engine, self.model = getattr(self, "engine", None), None, None
        self.__dict__.pop("image_prompts", None)  # the vision tower, if an image loaded it
        parallel, self.parallel = getattr(self, "parallel", None), None
        if parallel is not None:  # stops and joins the worker ranks
            parallel.close()
        if engine is None:
            return
        engine.close()
        dequant = sys.modules.get("nvfp4kit.kernels.dequant")  # loaded only if a prefill-sized GEMM ran
        if dequant is not None:
            dequant.release_scratch()  # the expanded-weight scratch (up to ~0.5 GB for the 26B-A4B experts)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:  # cuBLAS keeps a workspace per stream it ran on (graph captures)
                clear_workspaces()
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.engine is None:
            raise RuntimeError("this LLM is closed; create a new one")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: torch may already be gone
            pass

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    @functools.cached_property
    def image_prompts(self) -> ImagePrompts | None:
        """Image preprocessing and the vision tower (loaded at the first image); None for text-only checkpoints."""
        self._check_open()
        if self.language_model_only:
            return None
        if self.parallel is not None:  # the ranks' forward takes no image embeddings: refuse before any step
            raise ImagePartError(
                "images are not served with tensor_parallel_size > 1 yet; serve on one GPU to send images",
                "messages",
            )
        return ImagePrompts.from_checkpoint(
            self.path, dtype=self.model.dtype, device=self.device, backend=self.model.backend
        )

    def generate(
        self,
        prompts: str | Sequence[int] | dict | Sequence[str | Sequence[int] | dict],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt, batched; returns outputs in order. A prompt is a string, a list of token
        ids, `{"prompt": ...}` / `{"prompt_token_ids": [...]}`, or (for images, as vLLM)
        `{"prompt": "...<|image|>...", "multi_modal_data": {"image": image}}` with one `<|image|>` per image
        (PIL images, encoded bytes or paths; a list for several). `sampling_params` (or `params`): one for
        all prompts or one per prompt; `n` samples per prompt land in `outputs[0..n-1]`."""
        self._check_open()
        params = sampling_params if sampling_params is not None else params
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(
                f"{len(per_prompt)} sampling params for {len(prompts)} prompts; give one or one each"
            )
        outputs: list[RequestOutput] = []
        owners: dict[str, tuple[RequestOutput, int, bool]] = {}
        try:
            for prompt, prompt_params in zip(prompts, per_prompt):
                prompt_params = prompt_params or SamplingParams()
                ids, images = encode_prompt(prompt, self.tokenizer, lambda: self.image_prompts)
                output = RequestOutput(ids, prompt=_prompt_text(prompt))
                outputs.append(output)
                for index in range(prompt_params.n):
                    request_id = self.engine.add_request(
                        ids, self._sample_params(prompt_params, index), images=images
                    )
                    owners[request_id] = (output, index, prompt_params.logprobs is not None)
            with tqdm(total=len(owners), desc="generating", disable=not use_tqdm or len(owners) < 2) as bar:
                while self.engine.has_unfinished():
                    for event in self.engine.step():
                        output, index, want_logprobs = owners[event.request_id]
                        output.add(event, index, want_logprobs=want_logprobs)
                        bar.update(1 if event.finish_reason else 0)
        except BaseException:
            # a bad prompt, a failed step or Ctrl-C: no request of this call stays to break the next one
            for request_id in owners:
                self.engine.abort(request_id)
            raise
        return outputs

    def _sample_params(self, params: SamplingParams, index: int) -> SamplingParams:
        """Sample `index` of a prompt: its own seed (seed + index), or the LLM's running seed."""
        if params.seed is not None:
            return replace(params, seed=(params.seed + index) % 2**64)
        if self.seed is not None:
            self._request_counter += 1
            return replace(params, seed=(self.seed + self._request_counter) % 2**64)
        return params

    def get_tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (`encode`, `decode`, `special_tokens`), as vLLM's `LLM.get_tokenizer()`."""
        return self.tokenizer

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Chat as vLLM's `LLM.chat`: one conversation (a list of OpenAI-style messages) or a list of them,
        rendered with the checkpoint's chat template (client text tokenized as text); the replies are raw
        model text (parse thinking and tool calls with `nvfp4kit.serve.chat_output`)."""
        from nvfp4kit.prompting.prompt_tokens import render_chat_prompt, reopen_last_turn

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        rendered, images = [], []
        for conversation in conversations:
            # image parts (image_url data URLs, image_pil / image objects) -> the template's placeholder
            conversation, conversation_images = extract_images(list(conversation), allow_objects=True)
            images.append(conversation_images)
            prompt = render_chat_prompt(
                self.chat_template,
                self.tokenizer,
                list(conversation),
                tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                template_kwargs=chat_template_kwargs or {},
            )
            rendered.append(reopen_last_turn(self.tokenizer, prompt) if continue_final_message else prompt)
        prompts = [
            {"prompt_token_ids": r.ids, "multi_modal_data": {"image": i} if i else {}}
            for r, i in zip(rendered, images)
        ]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, prompt in zip(outputs, rendered):
            output.prompt = prompt.text
        return outputs

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        from nvfp4kit.prompting.chat_template import load_chat_template

        return load_chat_template(self.path)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate one request token by token (stop ids end it; a stop string ends it and is cut from the text)."""
        self._check_open()
        request_id = self.engine.add_request(list(prompt_ids), params)
        try:
            while True:
                for event in self.engine.step():
                    if event.request_id == request_id:
                        yield event
                        if event.finish_reason:
                            return
        finally:
            self.engine.abort(request_id)


def _prompt_text(prompt: Any) -> str | None:
    """A prompt's text for `RequestOutput.prompt` (None for token ids)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    return None


def _engine_options(config: EngineConfig, **options: Any) -> EngineConfig:
    """`LLM(...)`'s vLLM-named engine keywords over `engine_config` (the ones given win)."""
    names = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens"}
    changes = {field: options[name] for name, field in names.items() if options[name] is not None}
    if options["kv_cache_dtype"] is not None:
        changes["kv_dtype"] = options["kv_cache_dtype"]
    if options["enforce_eager"] is not None:
        changes["cuda_graphs"] = not options["enforce_eager"]
    if options["tensor_parallel_size"] > 1:
        # ranks replay decode graphs in lockstep (distributed/graphs.py); prefill graphs have no such path
        if config.prefill_graphs:
            raise ValueError("prefill CUDA graphs are not supported with tensor_parallel_size > 1")
        changes["prefill_graphs"] = ()
    return replace(config, **changes)
