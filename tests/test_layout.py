"""Imports run one way: data -> ops -> kernels -> norms -> models -> optim -> train.

Read from the source with `ast` (function-level imports included), so a cycle held together by
an import inside a function shows up as well.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_localnorm"


def _module_name(path: Path, root: Path = PACKAGE) -> tuple[str, str]:
    """(dotted module name, the package that relative imports start from)."""
    parts = ("mlx_localnorm",) + path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def _imported(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module (or module attribute) of mlx_localnorm named by an import in `path`."""
    _, package = _module_name(path, root)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level \
                else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("mlx_localnorm.")}


def _subpackage(name: str) -> str:
    """mlx_localnorm.norms.seed -> norms; mlx_localnorm.cli -> cli."""
    return name.split(".")[1]


def _graph() -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> the others it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module, _ = _module_name(path)
        source = _subpackage(module) if module != "mlx_localnorm" else "__init__"
        targets = {_subpackage(n) for n in _imported(path)} - {source}
        graph.setdefault(source, set()).update(targets)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_sees_a_function_level_import(tmp_path):
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    (tmp_path / "norms").mkdir()
    inner = tmp_path / "norms" / "seed.py"
    inner.write_text("def f():\n    from ..kernels import seednorm\n")
    assert _imported(inner, tmp_path) == {"mlx_localnorm.kernels",
                                          "mlx_localnorm.kernels.seednorm"}


def test_subpackages_import_each_other_one_way():
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize("lower,upper", [
    ("ops", "norms"), ("ops", "kernels"), ("kernels", "norms"), ("emulate", "kernels"),
    ("emulate", "norms"), ("norms", "models"), ("kernels", "models"),
])
def test_lower_layers_never_import_upper_ones(lower, upper):
    graph = _graph()
    assert lower in graph, f"mlx_localnorm.{lower} is missing"
    assert upper not in graph[lower], f"mlx_localnorm.{lower} imports mlx_localnorm.{upper}"


def test_the_ops_twins_are_the_functions_norms_and_kernels_share():
    import mlx_localnorm as ln
    from mlx_localnorm import ops

    for name in ("rms_norm", "seednorm", "patchnorm"):
        twin = getattr(ops, name)
        assert getattr(ln.norms, name) is twin, f"ln.norms.{name} is not ln.ops.{name}"
        assert getattr(ln.kernels, name) is not twin  # the fused version dispatches to it
