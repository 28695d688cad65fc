"""Layout: no function or method over 60 lines in derive/ and gddim_runtime/ (read with ast).

A long function does several jobs; the limit keeps each job a named piece that a reader can find.
The failure lists every offender as ``path:line name (lines)``.
"""

import ast

from conftest import ROOT

MAX_LINES = 60
PACKAGES = ("derive", "gddim_runtime")


def long_functions(source, max_lines=MAX_LINES):
    """(line, qualified name, length) of every def in ``source`` longer than ``max_lines`` lines
    (decorators excluded, docstring included); nested defs are counted on their own too."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > max_lines:
                        out.append((child.lineno, name, length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_counter_measures_def_to_last_line():
    """The counter itself, on code with known lengths: a 61-line function and a 60-line method."""
    body61 = "def f():\n" + "    x = 1\n" * 60
    body60 = "class C:\n    def m(self):\n" + "        x = 1\n" * 59
    nested = "def outer():\n    def inner():\n" + "        x = 1\n" * 60 + "    return inner\n"
    assert long_functions(body61) == [(1, "f", 61)]
    assert long_functions(body60) == []
    assert long_functions(nested) == [(1, "outer", 63), (2, "outer.inner", 61)]


def test_no_function_over_60_lines():
    offenders = [f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
                 for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
                 for line, name, length in long_functions(path.read_text())]
    assert not offenders, f"functions over {MAX_LINES} lines (split into named pieces):\n" + "\n".join(offenders)
