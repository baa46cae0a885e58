"""The code's layout, read from its imports (``ast``, imports inside functions included): the data path flows one
way, kernels/ knows nothing of models, no kernel file grows past what a newcomer reads at once, and the pieces
that are easy to copy (the llvmlite guard, the IR constants, Keras class names) are defined in one place."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The installed packages and their folders (pyproject.toml: kernels/ and weights/ sit at the repository's top).
PACKAGES = {"npmobile": ROOT / "npmobile", "npmobile.kernels": ROOT / "kernels", "npmobile.weights": ROOT / "weights"}
KERNEL_LINES = 400
# The NumPy reference is the spec every kernel is checked against: one file, read top to bottom.
LONG_KERNEL_FILES = {"reference.py"}
# Where the llvmlite guard (``ir``, ``types``, ``cgutils``: None in AOT mode) and the IR constants live.
IR_NAMES = {"ir", "types", "cgutils", "F32", "I32", "I64", "PTR"}
# Places that may name a Keras layer class as a string: the records, the readers, the passes, the model builders.
KERAS_NAMES_ALLOWED = ("npmobile/ops/", "npmobile/io/", "npmobile/passes/", "npmobile/applications/")


@cache
def modules() -> dict[str, Path]:
    """Every module of the installed packages, by its import name (``npmobile.kernels.gemm`` -> kernels/gemm.py)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def imported_names(name: str) -> set[str]:
    """What module ``name`` imports, anywhere in it (relative imports resolved; ``from pkg import mod`` is mod, not
    pkg: a package's ``__init__`` imported only on the way to its modules is no dependency of the importer)."""
    tree = ast.parse(modules()[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules())
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name of the package itself (``from npmobile import load``)
                found.add(base)
    return found


def internal_imports(name: str) -> set[str]:
    """The modules of the packages that module ``name`` imports."""
    return {other for other in imported_names(name) if other in modules() and other != name}


def import_cycles() -> list[list[str]]:
    """The strongly connected groups of more than one module in the import graph (Tarjan)."""
    graph = {name: sorted(internal_imports(name)) for name in modules()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def kernel_modules() -> list[str]:
    return sorted(name for name in modules() if name.startswith("npmobile.kernels."))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_import_graph_is_read_from_every_module():
    assert {"npmobile.graph", "npmobile.kernels.backend", "npmobile.weights.cache", "npmobile.io"} <= set(modules())
    assert "npmobile.kernels.backend" in internal_imports("npmobile.kernels.gemm_drivers")  # a relative import
    assert "npmobile.kernels.build" in internal_imports("npmobile.kernel_build")             # inside a function


def test_no_import_cycle():
    """The node types live in a leaf module (npmobile/nodes.py) that the graph, the records and the passes
    import; the records' table in another (npmobile/ops/record.py); fusion rules in passes/."""
    assert import_cycles() == []


def test_kernels_import_nothing_of_npmobile_but_its_errors():
    wrong = {name: sorted(other for other in imported_names(name) if other.startswith("npmobile")
                          and not other.startswith("npmobile.kernels") and other != "npmobile.errors"
                          and other != "npmobile._jit_kernels")
             for name in kernel_modules()}
    assert {name: found for name, found in wrong.items() if found} == {}


def test_no_kernel_file_is_longer_than_a_newcomer_reads_at_once():
    long = {relative(path): n for path in (ROOT / "kernels").glob("*.py")
            if path.name not in LONG_KERNEL_FILES and (n := len(path.read_text().splitlines())) > KERNEL_LINES}
    assert long == {}


def module_level_names(tree: ast.Module) -> set[str]:
    """The names a module assigns outside functions and classes (inside module-level if/try blocks too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_llvmlite_guard_and_the_ir_constants_are_defined_once():
    """vector_ir.py imports llvmlite's IR builder (or sets it to None in AOT mode) and defines the IR types; the
    microkernels import them from there."""
    defining, importing = {}, {}
    for name in kernel_modules():
        tree = ast.parse(modules()[name].read_text())
        top = [node for node in ast.walk(tree) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        own = module_level_names(tree) & IR_NAMES
        if own:
            defining[name] = sorted(own)
        if any(isinstance(node, ast.ImportFrom) and node.module == "llvmlite" or
               isinstance(node, ast.Import) and any(a.name == "llvmlite.ir" for a in node.names) for node in top):
            importing[name] = True
    assert defining == {"npmobile.kernels.vector_ir": sorted(IR_NAMES)}
    assert set(importing) == {"npmobile.kernels.vector_ir"}


def keras_class_names() -> set[str]:
    """The Keras layer classes npmobile reads (the records' names and aliases), and Keras's input layer."""
    from npmobile.ops import LAYER_TYPES

    names = {"InputLayer"}
    for name, record in LAYER_TYPES.items():
        if record.from_files:
            names.update((name, *record.aliases))
    return names


def keras_names_outside_the_records() -> dict[str, list[str]]:
    """Files that name a Keras layer class as a string, outside the places allowed to."""
    classes = keras_class_names()
    found = {}
    for path in sorted(modules().values()):
        where = relative(path)
        if where.startswith(KERAS_NAMES_ALLOWED):
            continue
        named = sorted({node.value for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.Constant) and node.value in classes})
        if named:
            found[where] = named
    return found


def test_keras_layer_classes_are_named_only_by_the_records_readers_passes_and_builders():
    assert keras_names_outside_the_records() == {}
