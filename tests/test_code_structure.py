"""The code stays readable in one sitting: no import circles between the project's modules, no private name
imported from another module, and no function longer than a screen (~60 lines, its docstring included) in
solvers/, bench/ and pretrained/ — declarative tables such as an argparse parser excepted, by name.  Read from
the source (ast), so a failure names the module, the name or the function to fix."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "bench", "pretrained")
MAX_FUNCTION_LINES = 60
# Declarative tables: a command line's options, one add_argument each.
TABLES = {"build_parser"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, top_level_only: bool):
    """(imported module, imported name or None, line) for every import of ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno)


def _project(name: str) -> str | None:
    """The project module ``name`` is or lies in (None outside the project)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_circles_between_modules():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, _, _ in _imports(m, path, top_level_only=True):
            t = _project(target)
            # a package's __init__ importing its own submodules is how a package is assembled, not a circle
            if t and t != m and not t.startswith(m + "."):
                graph[m].add(t)
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" → ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles (module level): {cycles}"


def test_no_private_names_imported_across_modules():
    found = []
    for m, path in MODULES.items():
        for target, name, line in _imports(m, path, top_level_only=False):
            if name and name.startswith("_") and not name.startswith("__") and _project(target):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name} from {target}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_functions_fit_on_a_screen(pkg):
    long = []
    for m, path in MODULES.items():
        if m.split(".")[0] != pkg:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in TABLES:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "functions over a screen:\n" + "\n".join(long)


def test_the_checks_see_the_project():
    """The checks above would pass vacuously on an empty module list: they must see the harness modules."""
    assert {"bench.run", "bench.sweep", "bench.config", "bench.references", "solvers.loop"} <= set(MODULES)
    edges = {_project(t) for t, _, _ in _imports("bench.sweep", MODULES["bench.sweep"], top_level_only=True)}
    assert {"bench.config", "bench.references", "bench.results"} <= edges


# Modules that still choose behaviour by a solver's name, each with why (issue 22 item 2 removes them).
NAME_TESTS_LEFT = {
    "solvers/interop/diffusers_config.py": "maps this library's solver names to diffusers' schedulers, by definition",
    "bench/report_analysis.py": "the DPM++-vs-DDIM observation (to become a rule on declared orders)",
    "bench/studies/animate.py": "the animation's grid (to come from the solvers' declared grid policy)",
    "bench/studies/pc_study.py": "a display label for the predictor-corrector row",
}


def _name_tests(path: Path, names: set) -> list[int]:
    """Lines where a solver's name (``name``, ``solver``, ``….name``, ``….solver``, ``…["solver"]``) is compared
    with a literal solver name."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any((isinstance(s, ast.Name) and s.id in ("name", "solver", "solver_name"))
                    or (isinstance(s, ast.Attribute) and s.attr in ("name", "solver"))
                    or (isinstance(s, ast.Subscript) and isinstance(s.slice, ast.Constant)
                        and s.slice.value in ("name", "solver")) for s in sides)
        literals = [e.value for s in sides for e in ([s] if isinstance(s, ast.Constant) else
                                                      getattr(s, "elts", [])) if isinstance(e, ast.Constant)]
        if named and any(v in names for v in literals if isinstance(v, str)):
            lines.append(node.lineno)
    return lines


def test_behaviour_follows_declared_properties_not_solver_names():
    """The harness and the solvers read what a solver declares (adaptive, is_stochastic, can_predict, its grid
    policy …), never compare its name with a string: a new solver then works everywhere without a list to edit."""
    import solvers
    names = set(solvers.available_solvers(aliases=True))
    found = {}
    for module, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        if rel not in NAME_TESTS_LEFT and (lines := _name_tests(path, names)):
            found[rel] = lines
    assert not found, f"solver names compared with string literals (use a declared property): {found}"
    for rel in NAME_TESTS_LEFT:
        assert _name_tests(ROOT / rel, names), f"{rel} no longer tests a solver's name: drop it from NAME_TESTS_LEFT"
