"""The import graph (read with ast, every import counted, also those inside functions).

- derive/_cli and derive/_pipeline do not import each other in both directions;
- between the packages derive and validation imports go one way: validation -> derive;
- gddim_runtime never imports sympy, mpmath or scipy (it must run alone on a GPU box), nor
  derive or validation;
- derive does not hide an import behind importlib/__import__ (a string import would make the
  walk above blind).
"""

import ast

import pytest

from conftest import ROOT

PACKAGES = ("derive", "validation", "gddim_runtime")


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)      # `from . import _x`
    return out


def graph():
    """module -> set of project modules it imports (names that are not modules are dropped)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: {n for n in _imports(p) if n in files} for m, p in files.items()}, files


def _reaches(g, start, goal):
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(g.get(m, ()))
    return False


def _package(m):
    return m.split(".")[0]


def test_walker_sees_relative_and_lazy_imports(tmp_path):
    """The walker itself: relative, `from . import`, and function-level imports are all found."""
    g, _ = graph()
    assert "derive._spec" in g["derive._grids"] or "derive._errors" in g["derive._grids"]
    assert "derive._cli" in g["derive.__main__"]
    assert "gddim_runtime._format" in g["derive._writer"]


def test_cli_and_pipeline_one_direction():
    g, _ = graph()
    cli_to_pipeline = _reaches(g, "derive._cli", "derive._pipeline")
    pipeline_to_cli = _reaches(g, "derive._pipeline", "derive._cli")
    assert not (cli_to_pipeline and pipeline_to_cli), "derive._cli and derive._pipeline import each other"
    assert not pipeline_to_cli, "the core imports the command line"


def test_derive_never_imports_validation():
    g, _ = graph()
    offenders = sorted((m, n) for m, deps in g.items() if _package(m) == "derive"
                       for n in deps if _package(n) == "validation")
    assert not offenders, f"derive imports validation (validation -> derive is the only direction): {offenders}"
    assert any(_package(n) == "derive" for m, deps in g.items() if _package(m) == "validation" for n in deps)


def test_no_hidden_string_imports_in_derive():
    _, files = graph()
    for m, path in files.items():
        if _package(m) != "derive":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert name not in ("import_module", "__import__"), f"{m}: {name}() hides an import from this test"


@pytest.mark.parametrize("forbidden", ["sympy", "mpmath", "scipy", "derive", "validation"])
def test_runtime_imports_only_runtime_libraries(forbidden):
    _, files = graph()
    for m, path in files.items():
        if _package(m) == "gddim_runtime":
            bad = sorted(n for n in _imports(path) if n.split(".")[0] == forbidden)
            assert not bad, f"{m} imports {bad}"


def _declared_verifiers():
    tomllib = pytest.importorskip("tomllib")
    from derive._pipeline import VERIFIER_GROUP
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project.get("entry-points", {}).get(VERIFIER_GROUP, {})


def test_installed_verifier_is_validation():
    """derive's check before writing is validation's check_table, found through the entry point."""
    from derive._pipeline import find_verifier
    from validation import check_table
    assert find_verifier() is check_table


def test_verifier_is_declared_in_pyproject():
    assert _declared_verifiers() == {"validation": "validation:check_table"}
