"""The layering the README's Layout section promises: configs -> data -> models -> evaluate -> train -> steps ->
components -> DAG -> CLI, checked on the source (imports inside functions included), and no import circles."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = [("ctv2v.config",), ("ctv2v.data",), ("ctv2v.models",), ("ctv2v.evaluate",), ("ctv2v.train",),
          ("ctv2v.steps",), ("components",), ("pipeline",)]
"""Lowest first; a module may import its own layer and those before it (train comes after evaluate: validation
scores with evaluation's metrics). `ctv2v.remote` and `ctv2v.tracking` are services: remote (S3, fetch) from the data
layer on, tracking from evaluate on. files, intensity, config_io, device (device, precision, process group) and
provenance (the code's commit) sit with the config."""

SERVICES = {"ctv2v.remote": "ctv2v.data", "ctv2v.tracking": "ctv2v.evaluate"}
"""A service package -> the lowest layer that may import it."""

BASE = {"ctv2v.config_io": "ctv2v.config", "ctv2v.device": "ctv2v.config", "ctv2v.files": "ctv2v.config",
        "ctv2v.intensity": "ctv2v.config", "ctv2v.provenance": "ctv2v.config"}


def _index(name: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if name in layer)


def _layer(module: str) -> int | None:
    for prefix, layer in BASE.items():
        if module == prefix or module.startswith(prefix + "."):
            return _index(layer)
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    return None


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of import nodes under `if TYPE_CHECKING:`: names for annotations, never executed."""
    return {id(child) for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for stmt in node.body for child in ast.walk(stmt)}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


SOURCES = sorted(p for folder in ("ctv2v", "components", "pipeline") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_flow_one_way(path):
    module = _module_name(path)
    own = _layer(module)
    wrong = []
    for imported, line in _imports(path):
        if module.startswith("ctv2v") and (imported.split(".")[0] in ("kfp", "pipeline", "components")):
            wrong.append(f"line {line}: {imported} (ctv2v/ must import without kfp, pipeline/ or components/)")
            continue
        for service, lowest in SERVICES.items():
            if (imported == service or imported.startswith(service + ".")) and not module.startswith(service):
                if own is not None and own < _index(lowest):
                    wrong.append(f"line {line}: {imported} (a service for {lowest} and above)")
        target = _layer(imported)
        if own is not None and target is not None and target > own:
            wrong.append(f"line {line}: {imported} (a later layer)")
    assert not wrong, f"{path.relative_to(REPO)} imports against the layering:\n" + "\n".join(wrong)


MODULES = {_module_name(path): path for path in SOURCES}


def _project_imports(path: Path) -> set[str]:
    """The modules of MODULES that `path` imports anywhere; `from package import module` imports the module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_only(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return (names & MODULES.keys()) - {_module_name(path)}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per group of modules that reach each other, as the modules around it in import order."""
    reach = {module: _reachable(graph, module) for module in graph}
    circles, seen = [], set()
    for module in sorted(graph):
        if module in seen or module not in reach[module]:
            continue
        group = {other for other in reach[module] if module in reach[other]}
        seen |= group
        circles.append(_path(graph, module, module, group))
    return circles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    found, todo = set(), [start]
    while todo:
        for imported in graph[todo.pop()] - found:
            found.add(imported)
            todo.append(imported)
    return found


def _path(graph: dict[str, set[str]], start: str, end: str, within: set[str]) -> list[str]:
    """The shortest import chain from `start` to `end` through `within` (breadth first)."""
    paths, todo = {start: [start]}, [start]
    while todo:
        module = todo.pop(0)
        for imported in sorted(graph[module] & within):
            if imported == end:
                return paths[module] + [end]
            if imported not in paths:
                paths[imported] = paths[module] + [imported]
                todo.append(imported)
    raise AssertionError(f"{end} is not reachable from {start}")


def test_modules_import_each_other_in_no_circle():
    """A circle only runs while some import in it stays inside a function; one home per concept leaves none."""
    circles = _circles({module: _project_imports(path) for module, path in MODULES.items()})
    assert not circles, "import circles (move what both sides need into a lower module):\n" + "\n".join(
        " -> ".join(circle) for circle in circles)


TESTS = sorted((REPO / "tests").rglob("test_*.py"))
MIRRORED = {path.name for path in (REPO / "ctv2v").iterdir() if (path / "__init__.py").exists()} | {
    "pipeline", "manifests", "images"}
"""tests/<folder>/ mirrors a sub-package of ctv2v/ (or pipeline/, manifests/, images/); tests of ctv2v's top-level
modules (config, intensity) and of the project as a whole (layout, the refusal table) stay in tests/ itself."""


@pytest.mark.parametrize("path", TESTS, ids=lambda p: str(p.relative_to(REPO / "tests")))
def test_test_modules_do_not_import_each_other(path):
    imported = [name for name, _ in _imports(path) if name.startswith("tests.") and ".test_" in f".{name}"]
    assert not imported, f"{path.name} imports another test module: {imported} (shared helpers go in conftest.py)"


def test_test_folders_mirror_the_package():
    folders = {path.parent.relative_to(REPO / "tests") for path in TESTS} - {Path(".")}
    assert all(len(folder.parts) == 1 and folder.name in MIRRORED for folder in folders), sorted(map(str, folders))
    assert all((REPO / "tests" / folder / "__init__.py").exists() for folder in folders)
