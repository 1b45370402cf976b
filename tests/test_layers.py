"""alya's modules import one way: values -> store -> cache/objects/summary -> engine -> Prefect -> facade.

Read from the source (every import statement, those under ``if TYPE_CHECKING:`` and inside functions
included), so a lazy or type-only import cannot hide a ring. A new module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import alya

ROOT = Path(alya.__file__).parent

LAYERS: dict[str, int] = {
    # values: types, errors, names and settings that everything may use
    "errors": 0, "models": 0, "validate": 0, "names": 0, "settings": 0, "logs": 0, "records": 0, "registry": 0,
    # the store: all SQL and the driver's errors
    "store": 1, "ingest": 1, "schema": 1, "migrate": 1, "embedded": 1, "readers": 1, "files": 1, "batches": 1,
    # cache, object store, summaries
    "cache": 2, "outputs": 2, "summary": 2, "services": 2, "intake": 2,
    # the engine: processing and recovery
    "engine": 3, "recovery": 3, "rowpool": 3, "outcomes": 3, "finishing": 3, "waker": 3,
    # Prefect
    "batchflow": 4, "dispatch": 4, "intakeflow": 4, "reaper": 4,
    # the facade
    "client": 5, "cli": 5, "demo": 5, "demo_prefect": 5, "export": 5, "views": 5, "__init__": 5,
}
NAMES = ["values", "store", "cache/objects/summary", "engine", "Prefect", "facade"]


def modules() -> dict[str, Path]:
    return {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The alya modules a file imports, anywhere in it."""
    found: set[str] = set()
    own = set(modules())
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("alya."):
                    found.add(a.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "alya":
                found.update(a.name for a in node.names if a.name in own)  # from alya import names
                if any(a.name not in own for a in node.names):
                    found.add("__init__")  # from alya import JobManager: the package itself
            elif node.module.startswith("alya."):
                found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_layer() -> None:
    assert set(modules()) <= set(LAYERS), f"give these modules a layer: {set(modules()) - set(LAYERS)}"


def test_imports_point_down() -> None:
    upward = []
    for name, path in modules().items():
        for dep in imports_of(path):
            if dep != name and LAYERS[dep] > LAYERS[name]:
                upward.append(f"{name} ({NAMES[LAYERS[name]]}) imports {dep} ({NAMES[LAYERS[dep]]})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    graph = {name: imports_of(path) - {name} for name, path in modules().items() if name != "__init__"}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_private_member_used_across_modules() -> None:
    """``obj._name`` on anything but ``self``/``cls`` reaches into another object's internals."""
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
