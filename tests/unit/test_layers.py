"""alya's subpackages import one way, down the layers:

    core -> db -> io -> batch -> engine -> prefect -> api -> cli

Read from the source (every import statement, those under ``if TYPE_CHECKING:`` and inside functions
included), so a lazy or type-only import cannot hide a ring. A new subpackage must be given a layer here.
Pure logic: no service needed."""

from __future__ import annotations

import ast
from pathlib import Path

import alya

ROOT = Path(alya.__file__).parent

LAYERS: dict[str, int] = {
    "core": 0,  # values everything may use: errors, models, names, settings, records, logs
    "db": 1, "migrations": 1,  # PostgreSQL: transport, typed queries, schema
    "io": 2,  # Redis, the object store, files of rows
    "batch": 3,  # batch-level operations: store a batch, its status, finish it, file intake
    "engine": 4,  # claims, rows, write-backs, maintenance
    "prefect": 5,  # flows, dispatch, the intake flows
    "api": 6, "__init__": 6,  # the facade (JobManager) and the package's public names
    "cli": 7,  # the alya command
}
NAMES = {v: k for k, v in LAYERS.items() if k not in ("migrations", "__init__")}


def modules() -> dict[str, Path]:
    """Every module as 'package.module' (the package's own __init__ as 'package.__init__')."""
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        out[".".join(rel.with_suffix("").parts)] = p
    return out


def package_of(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """The alya modules (dotted, below ``alya``) a file imports, anywhere in it."""
    found: set[str] = set()
    own = set(modules())
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "alya" and any(f"{a.name}" not in {m.split('.')[0] for m in own} for a in node.names):
                found.add("__init__")  # from alya import JobManager: the package itself
        for t in targets:
            if t.startswith("alya."):
                rest = t[len("alya."):]
                if rest in own:
                    found.add(rest)
                elif f"{rest}.__init__" in own:
                    found.add(f"{rest}.__init__")
    return found


def test_every_package_has_a_layer() -> None:
    packages = {package_of(m) for m in modules()}
    assert packages <= set(LAYERS), f"give these packages a layer: {packages - set(LAYERS)}"


def test_no_module_left_at_the_top() -> None:
    """Everything lives in a subpackage that says which layer it is (the package's __init__ aside)."""
    assert [m for m in modules() if "." not in m] == ["__init__"]


def test_imports_point_down() -> None:
    upward = []
    for name, path in modules().items():
        for dep in imports_of(path):
            a, b = LAYERS[package_of(name)], LAYERS[package_of(dep)]
            if b > a:
                upward.append(f"{name} ({NAMES.get(a, a)}) imports {dep} ({NAMES.get(b, b)})")
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


def test_no_module_over_400_lines() -> None:
    """A module that grows past this is doing more than one job: split it by role."""
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
