"""The package's shape: layers point one way, the toy world is a plug-in, modules stay short."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shortft"
MAX_LINES = 300
WORLD_LOADER = "shortft.builtin"  # the one module that loads built-in worlds by name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict) -> set[str]:
    """Every shortft module `path` imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("shortft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shortft"):
            for alias in node.names:  # `from shortft import rewards` imports the module shortft.rewards
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _drawn_layers() -> dict[str, int]:
    """docs/layout.md's drawing: module (or package) name -> its layer, counted from the left."""
    block = (PACKAGE.parent / "docs" / "layout.md").read_text().split("```")[1]
    layers = " ".join(block.split()).split("<-")
    return {f"shortft.{name}": i for i, layer in enumerate(layers) for name in layer.replace(",", " ").split()
            if not name.endswith("/")}


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the most specific name drawn for `module`: itself, else the package it is in."""
    parts = module.split(".")
    return next((layers[".".join(parts[:n])] for n in range(len(parts), 1, -1) if ".".join(parts[:n]) in layers), None)


def test_every_module_imports_only_its_layer_or_those_to_its_left_as_the_layout_page_draws_them():
    layers, unplaced, upward = _drawn_layers(), [], []
    for module, imported in _graph().items():
        if module == "shortft" or module.split(".")[1] in ("toy", "configs", "prompts", "spaces"):
            continue  # the package's own __init__ (the public API), the toy plug-in, data folders
        layer = _layer_of(module, layers)
        if layer is None:
            unplaced.append(module)
            continue
        upward += [f"{module} -> {m}" for m in sorted(imported) if (_layer_of(m, layers) or 0) > layer]
    assert not unplaced, f"docs/layout.md's drawing leaves out {unplaced}"
    assert not upward, f"imports against the layers docs/layout.md draws: {upward}"


def test_config_imports_no_other_shortft_module():
    assert _graph()["shortft.config"] == set()


def test_only_the_world_loader_reaches_the_toy_world():
    for name, path in _modules().items():
        if name.startswith("shortft.toy") or name == WORLD_LOADER:
            continue
        assert not any(m.startswith("shortft.toy") for m in _imports(path, _modules())), name
        assert "shortft.toy" not in path.read_text(), f"{name} names the toy package; go through {WORLD_LOADER}"


def test_core_imports_no_ray_mlflow_or_optuna():
    core = ("config", "plan", "denoiser", "chain", "lora", "models", "loop", "evaluate", "checkpoint", "data",
            "checks", "builtin", "rewards", "rewards.registry", "rewards.pixel", "architectures", "bench", "shortcut",
            "preflight", "progress")
    for name in core:
        tree = ast.parse((PACKAGE / (name.replace(".", "/") + ".py")).read_text()
                         if (PACKAGE / (name.replace(".", "/") + ".py")).exists()
                         else (PACKAGE / name / "__init__.py").read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("ray", "mlflow", "optuna") for n in names), (name, names)


def test_modules_stay_short_or_say_why():
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert lines <= MAX_LINES or "Over 300 lines:" in doc, f"{name}: {lines} lines and no reason in its docstring"


def test_the_layout_page_names_every_module():
    """docs/layout.md is where a reader finds a module: each one is named there, by file or by folder."""
    page = (PACKAGE.parent / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and p.relative_to(PACKAGE).parts[0] != "toy"
               and f"`{p.name}`" not in page and f"`{p.relative_to(PACKAGE)}`" not in page]
    assert not missing, f"docs/layout.md does not name {missing}"
