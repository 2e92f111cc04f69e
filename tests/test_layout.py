"""The package's map, as its docstring (mesh_convert/__init__.py) draws it: top-level modules and
subpackages in layers, each importing only from its own layer or the ones below it, no import cycle
between modules, and a self-contained remote-code pair."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mesh_convert"
# As the package's docstring draws them, bottom up.
LAYERS = {"errors": 0, "modeling": 0, "io": 1, "layout": 1, "options": 1, "loading": 2, "artifacts": 3,
          "convert": 4, "train": 5, "eval": 6, "analysis": 6, "hub": 7, "cli": 8, "__main__": 9}
REMOTE_CODE = ("configuration_mesh", "modeling_mesh")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every mesh_convert module `path` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mesh_convert")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mesh_convert"):
                modules = {f"{target}.{alias.name}" for alias in node.names}
                known = {m for m in modules if (PACKAGE.parent / (m.replace(".", "/") + ".py")).is_file()
                         or (PACKAGE.parent / m.replace(".", "/")).is_dir()}
                found |= known or {target}
    return found - {name}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[-1] == "__main__":  # `python -m` entry points (the package's, the launchers' train) import, never imported
        return "__main__"
    return parts[1] if len(parts) > 1 else None


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_layer_imports_a_higher_one():
    wrong = []
    for module, targets in GRAPH.items():
        own = layer(module)
        if own is None:  # the package's root names its public objects lazily
            continue
        for target in targets:
            other = layer(target)
            if other is None or other == own:
                continue
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_package_docstring_draws_these_layers():
    """What a reader sees first (the package's docstring, top layer first) is what is checked here."""
    import mesh_convert

    rows = [line[4:].split("  ")[0] for line in mesh_convert.__doc__.splitlines()
            if line.startswith("    ") and not line.startswith("     ")]
    drawn = [sorted("__main__" if name == "python -m entry points" else name for name in row.split(", "))
             for row in reversed(rows)]
    checked = [sorted(name for name, level in LAYERS.items() if level == value) for value in sorted(set(LAYERS.values()))]
    assert drawn == checked


def test_no_import_cycles():
    def visit(module, stack):
        if module in stack:
            return stack[stack.index(module):] + [module]
        for target in sorted(GRAPH.get(module, ())):
            if target in GRAPH and target != "mesh_convert":  # the root imports nothing until used
                cycle = visit(target, stack + [module])
                if cycle:
                    return cycle
        return None

    for module in GRAPH:
        assert visit(module, []) is None, visit(module, [])


def test_the_remote_code_pair_imports_only_each_other():
    for name in REMOTE_CODE:
        targets = imports(PACKAGE / "modeling" / f"{name}.py")
        assert targets <= {f"mesh_convert.modeling.{other}" for other in REMOTE_CODE}, targets


def test_few_top_level_modules():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
        "__init__.py", "__main__.py", "errors.py", "io.py", "layout.py", "loading.py", "options.py"
    ]


def test_the_remote_code_keeps_the_options_choices():
    """configuration_mesh.py is self-contained, so it has its own list of variants: the same as the options'."""
    from typing import get_args

    from mesh_convert.options import Variant
    from mesh_convert.modeling.configuration_mesh import VARIANTS

    assert get_args(Variant) == VARIANTS


def test_the_remote_code_keeps_the_packages_layout_and_defaults():
    """configuration_mesh.py has its own copy of the layout's format, of where a loop step stands in
    the unrolled stack, and of the memory's and the router gap's defaults (it must run without the
    package, and planning must run without transformers): the same as the package's."""
    from mesh_convert.convert.options import default_slots
    from mesh_convert.layout import Layout
    from mesh_convert.modeling.configuration_mesh import MeshConfig
    from mesh_convert.options import DEFAULT_ROUTER_GAP

    assert MeshConfig().router_gap == DEFAULT_ROUTER_GAP
    for P, C, K, Q in [(2, 4, 2, 2), (0, 3, 3, 1), (1, 1, 5, 0)]:
        config = MeshConfig(num_prelude_layers=P, num_core_layers=C, num_loops=K, num_coda_layers=Q,
                            num_hidden_layers=P + C * K + Q)
        layout = Layout.of(config)
        assert config.layout == layout.text and config.num_hidden_layers == layout.unrolled_layers
        assert config.num_slots == default_slots(K)
        assert [[config.unrolled_index("core", i, t) for i in range(C)] for t in range(K)] == layout.loop_sources()
        assert [config.unrolled_index("coda", j) for j in range(Q)] == [layout.layer_index(K, j) for j in range(Q)]
