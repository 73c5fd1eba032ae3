"""Triton's compiled-variant key, emulated on the CPU: a test can walk a launch sequence under the interpreter and
see which launches would compile a new variant on a GPU (engine/warmup.py's promise: after the warm-up, none)."""

from __future__ import annotations

import inspect

import torch


def arg_class(value: object, specialise: bool) -> tuple:
    """What Triton specialises a launch argument on: integers 1 / divisible by 16 / other (and 64-bit), a
    tensor's dtype and 16-byte alignment; an argument in `do_not_specialize` only by its type."""
    if isinstance(value, bool) or value is None:
        return ("value", value)
    if isinstance(value, int):
        kind = "1" if value == 1 else "16" if value % 16 == 0 else "other"
        return ("int", kind if specialise else None, abs(value) >= 2**31)
    if isinstance(value, float):
        return ("float",)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0 if specialise else None)
    return ("other", repr(value)[:60])


def record_variants(monkeypatch) -> set[tuple]:
    """Emulate Triton's variant key of every kernel launch (constexpr values, argument classes, launch options)
    and skip running it: the CPU then walks the engine's real launch sequence in milliseconds a step."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    keys: set[tuple] = set()

    def record(self, *args, grid, warmup, **kwargs):
        key = [self.fn.__qualname__]
        skipped = self.kwargs.get("do_not_specialize") or ()
        for i, (param, value) in enumerate(zip(inspect.signature(self.fn).parameters.values(), args)):
            const = param.annotation in (tl.constexpr, "tl.constexpr")
            specialise = param.name not in skipped and i not in skipped
            key.append((param.name, repr(value) if const else arg_class(value, specialise)))
        keys.add((*key, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return keys


def specialises(kernel, arg: str) -> bool:
    """Whether the Triton kernel `kernel` (compiled or interpreted) specialises its argument `arg` (False when
    it has none of that name)."""
    params = list(inspect.signature(kernel.fn).parameters)
    if arg not in params:
        return False
    skipped = getattr(kernel, "do_not_specialize", None)
    if skipped is None:  # the interpreter keeps the decorator's arguments as given
        skipped = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    skipped = skipped or ()
    return arg not in skipped and params.index(arg) not in skipped
