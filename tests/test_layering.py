"""The package imports one way: no module imports, at its top or inside a function, a module that imports it back
(directly or through others), and each lossops module imports only modules of its own layer or of the layers
below (docs/layout.md). Read from the source with `ast`, nothing imported.

An import of a.b.c also imports the packages a and a.b (their __init__ runs first), so those count as well, except
the importer's own packages, which are being imported already; a package whose __init__ imports all its modules
(lossops.losses, through pkgutil) imports each of them. Imports by a name computed at run time
(importlib.import_module: the backends' Triton modules, loaded on first use) are not seen.
"""
import ast
import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Module name prefix -> its folder (pyproject.toml installs triton_kernels/ as lossops.triton_kernels).
PACKAGES = {"lossops": {"lossops": REPO / "lossops", "lossops.triton_kernels": REPO / "triton_kernels"},
            "bench": {"bench": REPO / "bench"}}
# Compiled modules (setup.py): `from . import _C` imports lossops._C, not an attribute of lossops.
COMPILED = ("lossops._C",)

# Lowest first. What each layer holds, and why there:
LAYERS = (
    # helpers every other layer uses: checks, reductions, backend choice, the C++ library, the eager-path test
    ("helpers", ("lossops._version", "lossops._checks", "lossops._cpp", "lossops._reduce", "lossops._backend",
                 "lossops._eager")),
    # kernel declarations (a name and its keyword parameters), the Triton kernels, and the sharding record
    ("declarations", ("lossops._kernels", "lossops._sharding", "lossops.triton_kernels", "lossops.triton_kernels.*")),
    # the vocabulary-parallel algorithm and its autograd functions, which cross-entropy's DTensor path calls
    ("vocabulary parallel", ("lossops.distributed",)),
    # op, fake, autograd and Module from a declaration; no DTensor code
    ("family machinery", ("lossops._family",)),
    # the families and the machinery they share (softmax rows, elementwise losses, token options and statistics)
    ("families", ("lossops._elementwise", "lossops.losses", "lossops.losses.*")),
    # what is built on the families: DTensor inputs for every public function, Modules, the package itself
    ("above the families", ("lossops", "lossops._dtensor", "lossops.nn", "lossops.monitor", "lossops.selfcheck",
                            "lossops.integrations", "lossops.integrations.*")),
)


def _modules(folders: dict[str, Path]) -> dict[str, Path]:
    modules = {}
    for prefix, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _imported(modules: dict[str, Path], name: str, node: ast.AST) -> list[str]:
    """The package's modules an import statement in module `name` runs (and uses)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".") if _is_package(modules, name) else name.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        # `from package import x`: the module package.x where there is one, else an attribute of package
        targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in (*modules, *COMPILED) else source
                   for alias in node.names]
    result = []
    for target in targets:
        if target in COMPILED:
            continue
        while target not in modules and "." in target:  # `import a.b.c` of an attribute path
            target = target.rsplit(".", 1)[0]
        if target not in modules:
            continue  # torch, triton, ...
        own = set(_ancestors(name))
        result += [p for p in _ancestors(target) if p in modules and p not in own] + [target]
    return result


def _graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    graph = {name: {} for name in modules}
    for name, path in modules.items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(modules, name, node):
                    if target != name:
                        graph[name].setdefault(target, node.lineno)
        if _is_package(modules, name) and "pkgutil.iter_modules(__path__)" in source:
            line = next(k for k, text in enumerate(source.splitlines(), 1) if "pkgutil.iter_modules(__path__)" in text)
            for child in modules:
                if child.rsplit(".", 1)[0] == name:
                    graph[name].setdefault(child, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _loop(graph, component: list[str]) -> list[str]:
    """One shortest loop through the component's first module: [m, ..., m]."""
    start, inside = component[0], set(component)
    parent, frontier = {start: None}, [start]
    while True:
        following = []
        for a in frontier:
            for b in graph[a]:
                if b == start:
                    path = [a]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if b in inside and b not in parent:
                    parent[b] = a
                    following.append(b)
        frontier = following


def _describe(graph, modules, component: list[str]) -> str:
    loop = _loop(graph, component)
    return f"  {', '.join(component)}; for one:\n" + "\n".join(
        f"    {a} -> {b} ({modules[a].relative_to(REPO)}:{graph[a][b]})" for a, b in zip(loop, loop[1:]))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    modules = _modules(PACKAGES[package])
    graph = _graph(modules)
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other (a lazy import inside a function counts too):\n" + \
        "\n\n".join(_describe(graph, modules, c) for c in cycles)


def _layer(name: str):
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return rank
    return None


def test_each_lossops_module_imports_its_own_layer_or_below():
    modules = _modules(PACKAGES["lossops"])
    unplaced = sorted(name for name in modules if _layer(name) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layering.py LAYERS: {unplaced}"
    upward = [f"  {name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]}) at "
              f"{modules[name].relative_to(REPO)}:{line}"
              for name, targets in _graph(modules).items() for target, line in sorted(targets.items())
              if _layer(target) > _layer(name)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_graph_sees_lazy_and_package_imports():
    """The rules above are only as good as the graph: a function-level import, a relative import of a package's
    attribute, the implicit import of a parent package and pkgutil's imports are all edges."""
    graph = _graph(_modules(PACKAGES["lossops"]))
    assert "lossops._dtensor" in graph["lossops"]                  # from . import _dtensor, ...
    assert "lossops._cpp" in graph["lossops._backend"]              # from . import _cpp
    assert "lossops.losses" in graph["lossops.nn"]                  # from .losses import focal: runs losses/__init__
    assert "lossops.losses" not in graph["lossops.losses.focal"]    # its own package: being imported already
    assert "lossops.losses.cross_entropy" in graph["lossops.losses"]  # pkgutil
    assert "lossops._backend" in graph["lossops.triton_kernels.common"]  # from .. import _backend, _checks
    lazy = ast.parse("def f():\n    from . import nn\n").body[0].body[0]
    assert _imported(_modules(PACKAGES["lossops"]), "lossops._family", lazy) == ["lossops.nn"]
