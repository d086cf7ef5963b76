"""The SimReg package's shape: modules that import each other in one direction only, each of readable size."""

import ast
from pathlib import Path

import megatron_simreg.simreg

PACKAGE = Path(megatron_simreg.simreg.__file__).parent
MAX_LINES = 400


def package_imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "megatron_simreg.simreg":
            found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_simreg.simreg."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_modules_import_each_other_without_a_circle():
    graph = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py")}
    graph["__init__"] -= {"__init__"}
    assert all(name in graph for targets in graph.values() for name in targets)
    ordered = []  # leaves first: each module after everything it imports
    while len(ordered) < len(graph):
        ready = sorted(name for name, targets in graph.items() if name not in ordered and targets <= set(ordered))
        assert ready, f"import circle among {sorted(set(graph) - set(ordered))}: {graph}"
        ordered += ready
    assert ordered[-1] == "__init__" and all(name not in graph["plan"] for name in graph)


def test_no_module_is_over_400_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, sizes


def test_the_public_api_stays_where_it_was():
    from megatron_simreg.simreg import SimRegOutput, simreg_loss, simreg_terms

    assert simreg_loss.__module__ == simreg_terms.__module__ == SimRegOutput.__module__ == "megatron_simreg.simreg"
