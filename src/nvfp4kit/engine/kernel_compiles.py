"""Counting Triton compilations: those of the warm-up, and those that happen while serving.

A compilation while serving stops the step that needs the kernel, and with it every stream of the batch, for
0.3-2 s (a load from Triton's disk cache for less). `CompileWatch` hooks `triton.knobs.runtime.jit_post_compile_hook`
(chained to a hook set before it); after `mark_ready` (the engine's warm-up is done) each compilation is counted
apart and logged as a warning naming the kernel and its specialisation. `/metrics` exports both counts
(`nvfp4kit_kernel_compiles_total`, `nvfp4kit_kernel_compiles_after_warmup_total`). Under TRITON_INTERPRET nothing
is compiled, so both stay 0. Tensor-parallel worker ranks compile in their own processes, not counted here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class CompileWatch:
    """Triton compilations in this process: all of them, and those after `mark_ready` (the warm-up's end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.after_ready = 0
        self.ready = False
        self.installed = False
        self.serving_kernels: list[str] = []  # the kernels compiled after `mark_ready`, the first 100
        self._previous: Callable[..., Any] | None = None

    def install(self) -> bool:
        """Hook Triton's post-compile hook once; False when this Triton has none (counts stay at 0)."""
        with self._lock:
            if self.installed:
                return True
            try:
                import triton
            except ModuleNotFoundError:
                return False
            runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
            if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
                log.info("Triton %s has no jit_post_compile_hook: kernel compilations are not counted",
                         triton.__version__)  # fmt: skip
                return False
            self._previous = runtime.jit_post_compile_hook
            runtime.jit_post_compile_hook = self._on_compile
            self.installed = True
            return True

    def mark_ready(self) -> None:
        """From now on a compilation happens while serving: count it apart and warn."""
        self.ready = True

    def counts(self) -> tuple[int, int]:
        """(compilations in this process, compilations since the engine was ready)."""
        with self._lock:
            return self.total, self.after_ready

    def _on_compile(self, **kwargs: Any) -> Any:
        fn = kwargs.get("fn")
        name = f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', '?')}"
        with self._lock:
            self.total += 1
            serving = self.ready
            if serving:
                self.after_ready += 1
                count = self.after_ready
                if len(self.serving_kernels) < 100:
                    self.serving_kernels.append(name)
        if serving:
            log.warning(
                "Triton compiled a kernel variant while serving (%d since warm-up): %s; the step waited for "
                "it. Variant: %s", count, name, str(kwargs.get("repr", ""))[:600],
            )  # fmt: skip
        return self._previous(**kwargs) if self._previous is not None else None


COMPILES = CompileWatch()


def kernel_compile_counts() -> tuple[int, int]:
    """(Triton compilations in this process, compilations after the warm-up) for `/metrics`."""
    return COMPILES.counts()
