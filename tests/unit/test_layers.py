"""The layers point one way: apps -> converters -> edgeprefill, apps -> edgeprefill. Read from
the source (every import, the ones inside functions included), so no import is run."""
import ast
from pathlib import Path

from tests.conftest import ROOT


# folder in the checkout -> its installed package and its layer (higher may import lower)
LAYERS = {"edgeprefill": ("edgeprefill", 0), "converters": ("edgeprefill.converters", 1),
          "apps": ("edgeprefill.apps", 2)}


def module_layers():
    """{module name: layer} for every project module."""
    out = {}
    for folder, (package, layer) in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = (layer, path)
    return out


def imports_of(path):
    """Every module name an import statement in `path` names."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def layer_of(name, modules):
    """The layer of the project module `name` names (longest match), or None."""
    while name:
        if name in modules:
            return modules[name][0]
        name = name.rpartition(".")[0]
    return None


def import_cycles(modules):
    """Groups of project modules that import one another in a circle (Tarjan's strongly
    connected components over every import)."""
    def target(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {target(t) for t in imports_of(p)} - {None, m} for m, (_, p) in modules.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

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
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_points_against_the_layers():
    modules = module_layers()
    assert len(modules) > 40
    wrong = []
    for name, (layer, path) in modules.items():
        for target in imports_of(path):
            other = layer_of(target, modules)
            if other is not None and other > layer:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "imports against apps -> converters -> edgeprefill:\n" + "\n".join(wrong)


def test_the_library_never_names_the_old_top_level_packages():
    modules = module_layers()
    stray = [f"{path.relative_to(ROOT)}: {t}" for _, path in modules.values()
             for t in imports_of(path) if t.split(".")[0] in ("apps", "converters")]
    assert not stray, stray


def test_no_modules_import_one_another_in_a_circle():
    cycles = import_cycles(module_layers())
    assert not cycles, f"import cycles: {cycles}"
