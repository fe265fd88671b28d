"""The import rules that `lint-imports` (pyproject.toml, ``[tool.importlinter]``) cannot see as rules:
no project module is imported inside a function (where a circle would hide), except where
``[tool.gift.function-local-imports]`` in pyproject.toml allows it, with the reason."""
import ast
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("gift", "gift_kernels", "bench")
# the folders whose modules are checked (tests/ are not layers)
CHECKED = ("gift", "gift_kernels", "bench", "docs")


def module_name(path: str) -> str:
    """``gift/app/cli.py`` -> ``gift.app.cli``; ``gift/__init__.py`` -> ``gift``."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def function_local_imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """``(module.function, imported module, line)`` of every project import inside a function of ``source``
    (relative imports resolved against ``module``); ``importlib.import_module`` calls count as imports of
    ``(importlib)``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node, scope: str, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{scope}.{child.name}", in_function or not isinstance(child, ast.ClassDef))
                continue
            if in_function:
                targets = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    parts = package.split(".")
                    base = parts[:len(parts) - child.level + 1] if child.level else []
                    targets = [".".join(base + ([child.module] if child.module else []))]
                elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                      and child.func.attr == "import_module"):
                    targets = ["(importlib)"]
                found.extend(
                    (scope, t, child.lineno) for t in targets if t == "(importlib)" or t.split(".")[0] in PROJECT
                )
            visit(child, scope, in_function)

    visit(ast.parse(source), module, False)
    return found


def project_function_local_imports() -> list[tuple[str, str, int]]:
    found = []
    for top in CHECKED:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8") as src:
                        found += function_local_imports(src.read(), module_name(path), f == "__init__.py")
    return found


def allowed() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["gift"]["function-local-imports"]


def test_no_project_module_is_imported_inside_a_function_unless_allowed_with_a_reason():
    allow = allowed()
    assert all(isinstance(why, str) and len(why.split()) >= 4 for why in allow.values()), allow
    found = project_function_local_imports()
    unexpected = [f"{where} imports {target} (line {line})" for where, target, line in found
                  if f"{where} -> {target}" not in allow]
    assert not unexpected, "import these at the top, or allow them with the reason in pyproject.toml:\n" + \
        "\n".join(unexpected)
    used = {f"{where} -> {target}" for where, target, _ in found}
    checked = {e for e in allow if e.split(".")[0].split(" ")[0] in CHECKED}
    assert not checked - used, f"allowed but no longer there: {sorted(checked - used)}"


@pytest.mark.parametrize("module, source, expected", [
    ("gift.plan", "def f():\n    from .fast import FastGIFT\n", [("gift.plan.f", "gift.fast", 2)]),
    ("gift.app.train", "def f():\n    from ..files import atomic_write\n", [("gift.app.train.f", "gift.files", 2)]),
    ("gift.plan", "class A:\n    def g(self):\n        import gift_kernels.dispatch\n",
     [("gift.plan.A.g", "gift_kernels.dispatch", 3)]),
    ("gift.plan", "def f():\n    def inner():\n        import importlib\n        importlib.import_module(x)\n",
     [("gift.plan.f.inner", "(importlib)", 4)]),
    ("gift.plan", "import gift.fast\nfrom . import config\n\nclass A:\n    from . import memory\n\n"
                  "def f():\n    import peft\n    return 1\n", []),
])
def test_the_check_sees_imports_in_functions_and_methods_and_only_those(module, source, expected):
    """Known bad and known good sources: a function-local project import (relative or absolute, in a
    method, in a nested function, through importlib) is found; top-level, class-level and third-party
    ones are not."""
    assert function_local_imports(source, module) == expected
