"""The package's structure (docs/design.md): floors that import only downwards, no import cycle,
no function-level import of a phema module below the front, one home for the commit rule."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "phema"

# Each module's floor (docs/design.md): a module imports only modules on its floor or below.
FLOORS = {
    "phema._core": 0,
    "phema.errors": 1,
    "phema.naming": 1,
    "phema.meta": 1,
    "phema.files": 1,
    "phema.locations": 1,
    "phema.dcp": 1,
    "phema.store": 2,
    "phema.solver": 2,
    "phema.targets": 2,
    "phema.plan": 3,
    "phema.cluster": 3,
    "phema.engine": 3,
    "phema.reconstruction": 4,
    "phema.average": 4,
    "phema.importers*": 4,
    "phema.tracker*": 4,
    "phema.load": 5,
    "phema.sweeps*": 6,
    "phema.integrations*": 6,
    "phema.guidance*": 2,
    "phema": 7,
    "phema.demo*": 7,
    "phema.cli": 8,
    "phema.__main__": 9,
}
# The front may import phema modules inside functions, so that start-up stays fast.
FRONT = ("phema", "phema.cli", "phema.__main__", "phema.demo*")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    for pattern, floor in FLOORS.items():
        if fnmatch.fnmatchcase(module, pattern) or module == pattern.removesuffix("*"):
            return floor
    raise AssertionError(f"{module} has no floor in FLOORS: add it (and to docs/design.md)")


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(phema module imported, line, inside a function) for every import in `path`, type-only
    imports included."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from phema import naming` imports the module phema.naming.
                names = [
                    f"{child.module}.{a.name}"
                    if f"{child.module}.{a.name}" in known
                    else child.module
                    for a in child.names
                ]
            for name in names:
                if name == "phema" or name.startswith("phema."):
                    while name not in known and "." in name:
                        name = name.rsplit(".", 1)[0]
                    found.append((name, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _modules()
    known = set(modules) | {"phema._core"}
    return {m: _imports(p, known) for m, p in modules.items()}


def test_every_import_goes_to_the_same_floor_or_below():
    upward = [
        f"{m}:{line} imports {target} (floor {_floor(target)} > {_floor(m)})"
        for m, imports in _graph().items()
        for target, line, _ in imports
        if _floor(target) > _floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_among_phema_modules():
    graph = {m: {t for t, _, _ in imports if t != m} for m, imports in _graph().items()}
    # A package's __init__ importing its own submodules is how a package hands names on.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_function_level_import_of_a_phema_module_below_the_front():
    hidden = [
        f"{m}:{line} imports {target} inside a function"
        for m, imports in _graph().items()
        if not any(fnmatch.fnmatchcase(m, f) for f in FRONT)
        for target, line, in_function in imports
        if in_function
    ]
    assert not hidden, "\n".join(hidden)


def test_files_are_committed_by_the_core_alone():
    """Renames of outputs and snapshots happen in the core's writer (temporary name, fsync,
    rename, directory sync): Python never moves a file into place itself."""
    moves = re.compile(r"\b(os\.replace|os\.rename|shutil\.move|Path\([^)]*\)\.rename)\(")
    found = [
        f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if moves.search(line)
    ]
    assert not found, "\n".join(found)


RUST = PACKAGE.parent.parent / "rust"

# The Rust core's floors (docs/design.md): a module `use`s only its own floor or those below.
RUST_FLOORS = {
    "error": 0,
    "failpoint": 0,
    "threads": 0,
    "math": 1,
    "format": 2,
    "remote": 3,
    "store": 4,
    "engine": 5,
    "output": 6,
    "ops": 7,
    "bindings": 8,
    "lib": 9,
}


def _rust_top(path: Path) -> str:
    return path.relative_to(RUST).parts[0].removesuffix(".rs")


def test_rust_modules_use_only_their_floor_or_below():
    """`use crate::X` (and `crate::X::` paths) outside tests point at the same floor or lower;
    every file of the crate belongs to a floor."""
    uses = re.compile(r"\bcrate::([a-z_]+)")
    upward = []
    for path in sorted(RUST.rglob("*.rs")):
        top = _rust_top(path)
        assert top in RUST_FLOORS, f"{path.relative_to(RUST)} belongs to no floor"
        if path.name == "tests.rs":
            continue
        text = path.read_text().split("#[cfg(test)]", 1)[0]
        for n, line in enumerate(text.splitlines(), 1):
            for used in uses.findall(line.split("//", 1)[0]):
                if RUST_FLOORS[used] > RUST_FLOORS[top]:
                    upward.append(f"{path.relative_to(RUST)}:{n}: {line.strip()}")
    assert not upward, "\n".join(upward)


def test_the_floors_cover_every_module():
    for module in _modules():
        _floor(module)


def _module_trail(argv: list[str]) -> list[str]:
    """The phema modules `phema.cli.main(argv)` runs in, in order, consecutive frames of one
    module merged (a module's loops over snapshots or tensors count once)."""
    import sys

    from phema.cli import main

    trail: list[str] = []
    root = str(PACKAGE)

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        if event not in ("call", "return"):
            return
        # The frame we are now in: the callee on a call, the caller on a return.
        f = frame if event == "call" else frame.f_back
        path = f.f_code.co_filename if f is not None else ""
        module = _module(Path(path)) if path.startswith(root) else None
        if module is not None and (not trail or trail[-1] != module):
            trail.append(module)

    sys.setprofile(profile)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
    return trail


def test_reconstruct_goes_one_way(tmp_path, capsys):
    """`phema reconstruct` on a 20-snapshot store: listing, labels and metadata come from the
    core in one call, so the path has no Python call per snapshot or tensor and returns to a
    module it already left at most 10 times."""
    from conftest import make_store

    store = tmp_path / "store"
    make_store(store, list(range(100, 1100, 100)), {"w": (8, 4), "b": (4,)})
    argv = ["reconstruct", str(store), "--sigma-rel", "0.08", "--out", str(tmp_path / "out")]
    _module_trail(argv)  # the first run imports modules; the second is the steady state
    trail = _module_trail([*argv[:-1], str(tmp_path / "out2")])
    left: set[str] = set()
    returns = 0
    for prev, cur in zip(trail, trail[1:]):
        left.add(prev)
        returns += cur in left
    assert returns <= 10, f"{returns} returns: {' > '.join(trail)}"
