"""Benchmark scenarios for `nvfp4kit bench SCENARIO`.

Each module in this package that defines `register_scenario(scenarios)` adds one scenario: it creates its
sub-parser on `scenarios` and sets `func` to a callable taking the parsed arguments and returning an exit
code. Adding a scenario is adding a file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register_all(scenarios: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register_scenario"):
            module.register_scenario(scenarios)
