"""The package's import graph: arrows point down the layers, and no module imports itself back.

cli -> chat -> generate, bench, server -> engine, train -> backends, checkpoint ->
quantize, context, lora -> model -> scan, state, tokenizer, sampling, corpus ->
config, _io, hub, triton_scan.
A lower layer never imports a higher one (the model never learns that a
backend exists), and imports inside functions count too.
"""

import ast
from pathlib import Path

import rgemma

PACKAGE = Path(rgemma.__file__).parent
# Lowest first; a module's layer is that of its top-level name (rgemma.backends.cpu: "backends").
LAYERS = [
    {"config", "triton_scan", "_io", "_lazy", "hub"},
    {"scan", "state", "tokenizer", "sampling", "corpus"},
    {"model"},
    {"quantize", "context", "lora"},
    {"checkpoint", "backends"},
    {"engine", "train"},
    {"generate", "bench", "server"},
    {"chat"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The rgemma modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "rgemma":
                found |= {f"rgemma.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("rgemma.")}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py") if path.name != "__main__.py"}


def layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in graph() if m != "rgemma"} == set().union(*LAYERS)


def test_imports_point_down():
    upward = [
        f"{module} -> {target}" for module, targets in graph().items() if module != "rgemma"
        for target in targets
        if module.split(".")[1] != target.split(".")[1] and layer(target) >= layer(module)
    ]
    assert not upward


def test_no_import_cycles():
    edges = graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in edges.get(module, ()):
            visit(target)
        path.pop()
        done.add(module)

    for module in edges:
        visit(module)
