"""The package's imports only go down its layers (scripts/import_graph.py: the layers and the checker)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def _checker():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_and_no_upward_import():
    graph = _checker()
    edges = graph.graph()
    assert not sorted({graph.part_of(m) for m in edges} - set(graph.LAYERS)), "a new package needs a layer"
    module_circles, package_circles, upward = graph.findings(edges)
    assert module_circles == []
    assert package_circles == []  # e.g. serve -> llm -> serve, even when each import stays in one layer
    assert upward == []


def test_the_api_sits_below_its_users():
    """llm.py renders chats and tunes kernels through packages below it, not through serve/ or bench/."""
    graph = _checker()
    edges = graph.graph()
    assert graph.LAYERS["prompting"] < graph.LAYERS["llm"] < graph.LAYERS["serve"]
    assert graph.LAYERS["tuning"] < graph.LAYERS["llm"] < graph.LAYERS["bench"]
    assert {graph.part_of(m) for m in edges["nvfp4kit.llm"]}.isdisjoint({"serve", "bench", "testing", "eval"})


def test_the_checker_sees_a_circle_and_an_upward_import():
    graph = _checker()
    edges = {"nvfp4kit.model.a": {"nvfp4kit.kernels.b"}, "nvfp4kit.kernels.b": {"nvfp4kit.model.a"}}
    module_circles, part_circles, upward = graph.findings(edges)
    assert module_circles == [["nvfp4kit.kernels.b", "nvfp4kit.model.a"]]
    assert part_circles == [["kernels", "model"]]
    assert upward == [("nvfp4kit.model.a", "nvfp4kit.kernels.b")]
