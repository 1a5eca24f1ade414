"""The layout holds: no import cycles in erase/ (eval included), no import from a lower layer into a
higher one, and no function longer than MAX_FUNCTION_LINES. Read from the source with ast, so nothing
is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 100

# What each layer may not import (module-name prefixes), lazily inside a function or not.
FORBIDDEN = {
    # the backbones are the bottom of the engine: they build no training data and know no method
    "erase.backbones": ("erase.unlearn_data", "erase.concept_data", "erase.concepts", "erase.noising", "erase.methods",
                        "erase.unlearning", "erase.loop", "erase.robust", "erase.eval", "erase.training"),
    # the data layer draws batches; the methods compute losses on them
    "erase.unlearn_data": ("erase.methods", "erase.unlearning", "erase.loop", "erase.robust"),
    "erase.concept_data": ("erase.methods", "erase.unlearning", "erase.loop", "erase.robust"),
    "erase.noising": ("erase.methods", "erase.unlearning", "erase.unlearn_data", "erase.concept_data"),
    "erase.methods": ("erase.unlearning.runner", "erase.unlearning.running", "erase.loop", "erase.eval", "erase.training"),
    # the evaluation imports no trainer of the shipped models (what it needs of the digits is erase.digits)
    "erase.eval": ("erase.training", "erase.bench", "erase.demo", "erase.methods", "erase.unlearning", "erase.loop"),
    "erase.digits": ("erase.training",),
    # the model the evaluation loads is apart from its trainer
    "erase.classifier": ("erase.training",),
}
# Exceptions to FORBIDDEN, each with its reason. None now: the report reads a run's `erase unlearn`
# command from its erase_config.json instead of rebuilding it from the method registry.
ALLOWED: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for root, package in ((REPO / "erase", "erase"), (REPO / "eval", "erase.eval")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str], *, top_level_only: bool) -> set[str]:
    """The modules of `known` that `name` imports (`from pkg import sub` counts `pkg.sub` when it is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    """Module-level imports form no cycle; neither do the imports inside functions, taken together."""
    known = modules()
    for top_level_only in (True, False):
        graph = {n: imports_of(n, p, set(known), top_level_only=top_level_only) for n, p in known.items()}
        # a package's __init__ importing its own submodules is how a package exports: not a cycle
        graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> None:
            state[node] = 1
            stack.append(node)
            for dep in sorted(graph[node]):
                if state.get(dep) == 1:
                    cycle = stack[stack.index(dep):] + [dep]
                    raise AssertionError(f"import cycle ({'top-level' if top_level_only else 'any'} imports): "
                                         + " -> ".join(cycle))
                if dep not in state:
                    visit(dep)
            stack.pop()
            state[node] = 2

        for node in sorted(graph):
            if node not in state:
                visit(node)


def test_no_import_from_a_lower_layer_into_a_higher_one():
    known = modules()
    bad = []
    for name, path in known.items():
        for layer, forbidden in FORBIDDEN.items():
            if name == layer or name.startswith(layer + "."):
                bad += [f"{name} imports {dep}" for dep in imports_of(name, path, set(known), top_level_only=False)
                        if any(dep == f or dep.startswith(f + ".") for f in forbidden) and (name, dep) not in ALLOWED]
    assert not bad, "\n".join(sorted(bad))


def test_the_layering_check_sees_a_forbidden_import(tmp_path):
    """The check above can fail: a backbone importing the data layer is found."""
    path = tmp_path / "ddpm.py"
    path.write_text("def f():\n    from ..unlearn_data import class_erasure_data\n")
    assert imports_of("erase.backbones.ddpm", path, set(modules()), top_level_only=False) == {"erase.unlearn_data"}


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_is_longer_than_the_limit():
    long = [f"{where} ({n} lines)" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)
