"""The package's import graph: circles and imports that run up the layer order.

    python scripts/import_graph.py            # summary and every finding
    python scripts/import_graph.py --check    # exit 1 if there is a circle or an upward import

Reads the sources with `ast` (nothing is imported). Every `import nvfp4kit...` counts, at module level or
inside a function (a deferred import is still a dependency); imports under `if TYPE_CHECKING:` (annotations
only) are reported apart. A "module:attr" string in a lazy registry table is not an import: it is how a lower
layer names a plugin that lives above it.

Layers, lowest first (a module may import its own layer and the ones below it, never one above):

    0 base      config, tokenizer, sampling, demo (the demo model's location), __init__
      prompting chat templates and chat prompt tokens
    1 formats   safetensors, NVFP4 numerics, checkpoint formats
    2 model     the Gemma 4 decoder, its op interface (OpBackend) and weight loading
    3 kernels   Triton kernels and the Triton OpBackend
    4 plan      byte arithmetic (what fits on a card)
      quant     layer-wise calibration and export
      vision    the image tower and image inputs
      tuning    kernel benchmark cases, GPU timing, launch-configuration search (`nvfp4kit tune`)
    5 engine    KV pools, scheduler, batched steps, CUDA graphs
      distributed  tensor/expert parallel ranks (rank 0 runs the engine)
    6 llm       the LLM API
    7 eval, serve, bench, testing (users of the LLM API)
    8 cli, __main__
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "nvfp4kit"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS = {
    "config": 0,
    "tokenizer": 0,
    "sampling": 0,
    "demo": 0,
    "prompting": 0,
    "__init__": 0,
    "formats": 1,
    "model": 2,
    "kernels": 3,
    "plan": 4,
    "quant": 4,
    "vision": 4,
    "tuning": 4,
    "engine": 5,
    "distributed": 5,
    "llm": 6,
    "eval": 7,
    "serve": 7,
    "bench": 7,
    "testing": 7,
    "cli": 8,
    "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The top-level package or module of `nvfp4kit.x.y` (x), or `__init__` for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        name = (
            test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        )
        if name == "TYPE_CHECKING":
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def imports_of(path: Path, modules: set[str], *, type_only: bool) -> set[str]:
    """The package's modules that `path` imports at run time (or, with `type_only`, for annotations only);
    a name imported from a package counts as its submodule when it is one."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    here = me if path.name == "__init__.py" else me.rpartition(".")[0]
    annotations = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if (id(node) in annotations) != type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    # `from nvfp4kit.x import y` adds both nvfp4kit.x and nvfp4kit.x.y; keep only the most specific
    return {m for m in found if not any(o.startswith(m + ".") for o in found)} or found


def graph(*, type_only: bool = False) -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules, type_only=type_only) for p in paths}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (src, dst)
        for src, targets in edges.items()
        for dst in targets
        if LAYERS[part_of(dst)] > LAYERS[part_of(src)]
    )


def findings(edges: dict[str, set[str]]) -> tuple[list[list[str]], list[list[str]], list[tuple[str, str]]]:
    """Module circles, package circles (between top-level packages) and upward imports of a graph."""
    parts: dict[str, set[str]] = {}
    for src, targets in edges.items():
        parts.setdefault(part_of(src), set()).update(
            part_of(t) for t in targets if part_of(t) != part_of(src)
        )
    return circles(edges), circles(parts), upward(edges)


def report(title: str, edges: dict[str, set[str]]) -> int:
    module_circles, part_circles, up = findings(edges)
    print(f"{title}: {sum(map(len, edges.values()))} imports inside the package")
    print(f"  module circles: {len(module_circles)}")
    for c in module_circles:
        print("    " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in c))
    print(f"  package circles: {len(part_circles)}")
    for c in part_circles:
        print("    " + " <-> ".join(c))
    print(f"  upward imports: {len(up)}")
    for src, dst in up:
        print(f"    {src.removeprefix(PACKAGE + '.')} -> {dst.removeprefix(PACKAGE + '.')}")
    return len(module_circles) + len(part_circles) + len(up)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on any circle or upward import")
    args = parser.parse_args()
    runtime, annotations = graph(), graph(type_only=True)
    unknown = sorted({part_of(m) for m in runtime} - set(LAYERS))
    if unknown:
        print(f"no layer for: {', '.join(unknown)} (add them to LAYERS)")
        return 1
    print(f"{len(runtime)} modules")
    problems = report("run-time imports (module level and deferred)", runtime)
    combined = {m: runtime[m] | annotations[m] for m in runtime}
    problems += report("with the annotation-only imports (under TYPE_CHECKING) added", combined)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
