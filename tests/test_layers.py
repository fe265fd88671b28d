"""The import rules: the `lint-imports` contracts (pyproject.toml, ``[tool.importlinter]``), each shown to
fail on its own on a known-bad copy of the project, and what they cannot see as rules: no project module is
imported inside a function (where a circle would hide), nor through ``importlib`` / ``__import__`` anywhere
(which no import graph sees), except where ``[tool.gift.function-local-imports]`` in pyproject.toml allows
it, with the reason."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # import-linter, which `make test` needs anyway, installs tomli before Python 3.11
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("gift", "gift_kernels", "bench")
# the folders whose modules are checked (tests/ are not layers)
CHECKED = ("gift", "gift_kernels", "bench", "docs")
DYNAMIC_IMPORTS = ("import_module", "__import__")  # importlib.import_module, import_module, __import__


def module_name(path: str) -> str:
    """``gift/app/cli.py`` -> ``gift.app.cli``; ``gift/__init__.py`` -> ``gift``."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dynamic_target(call: ast.Call, package: str) -> str | None:
    """What an ``import_module(...)`` / ``__import__(...)`` call imports, as ``(importlib) TARGET``: a string
    resolved to its absolute module name, an f-string with its fields as written
    (``gift.app.commands.{name}``), anything else as its source text; None for a literal module outside the
    project."""
    if not call.args:
        return "(importlib) ?"
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        name = arg.value
        if name.startswith("."):
            dots = len(name) - len(name.lstrip("."))
            parts = package.split(".")
            name = ".".join(parts[:len(parts) - dots + 1] + [name.lstrip(".")])
        return f"(importlib) {name}" if name.split(".")[0] in PROJECT else None
    if isinstance(arg, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in arg.values)
        return f"(importlib) {text}"
    return f"(importlib) {ast.unparse(arg)}"


def late_imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """``(scope, imported module, line)`` of every project import of ``source`` that is not at the top of
    the module: ``import`` statements inside a function (``scope``: ``module.function``; relative imports
    resolved against ``module``, ``from . import x`` as ``package.x``), and calls of ``import_module`` or
    ``__import__`` anywhere, in a lambda or at the top too (``scope``: ``module``, ``module.<lambda>``), as
    ``(importlib) TARGET``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node, scope: str, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{scope}.{child.name}", in_function or not isinstance(child, ast.ClassDef))
                continue
            if isinstance(child, ast.Lambda):
                visit(child, f"{scope}.<lambda>", True)
                continue
            targets = []
            if in_function and isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif in_function and isinstance(child, ast.ImportFrom):
                parts = package.split(".")
                base = parts[:len(parts) - child.level + 1] if child.level else []
                if child.module:
                    targets = [".".join(base + [child.module])]
                else:  # from . import x, y: the modules x and y of the package
                    targets = [".".join(base + [a.name]) for a in child.names]
            elif isinstance(child, ast.Call):
                func = child.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in DYNAMIC_IMPORTS:
                    target = _dynamic_target(child, package)
                    targets = [target] if target else []
            found.extend((scope, t, child.lineno) for t in targets
                         if t.startswith("(importlib)") or t.split(".")[0] in PROJECT)
            visit(child, scope, in_function)

    visit(ast.parse(source), module, False)
    return found


def project_late_imports() -> list[tuple[str, str, int]]:
    found = []
    for top in CHECKED:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8") as src:
                        found += late_imports(src.read(), module_name(path), f == "__init__.py")
    return found


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def allowed() -> dict[str, str]:
    return pyproject()["tool"]["gift"]["function-local-imports"]


def test_no_project_module_is_imported_inside_a_function_unless_allowed_with_a_reason():
    allow = allowed()
    assert all(isinstance(why, str) and len(why.split()) >= 4 for why in allow.values()), allow
    found = project_late_imports()
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
     [("gift.plan.f.inner", "(importlib) x", 4)]),
    # from . import x: the module x, not the package
    ("gift_kernels.dev.kernel_launches", "def f():\n    from .. import paca_triton, residual_triton\n",
     [("gift_kernels.dev.kernel_launches.f", "gift_kernels.paca_triton", 2),
      ("gift_kernels.dev.kernel_launches.f", "gift_kernels.residual_triton", 2)]),
    # importlib, import_module and __import__ anywhere: in a function, a lambda, at the top of the module
    ("gift.predict", "import importlib\nLOAD = lambda: importlib.import_module('gift.fast')\n",
     [("gift.predict.<lambda>", "(importlib) gift.fast", 2)]),
    ("gift.predict", "import importlib\nFAST = importlib.import_module('.fast', __package__)\n",
     [("gift.predict", "(importlib) gift.fast", 2)]),
    ("gift.predict", "from importlib import import_module\n\ndef f():\n    return import_module('gift.fast')\n",
     [("gift.predict.f", "(importlib) gift.fast", 4)]),
    ("gift.predict", "def f():\n    return __import__('gift.fast')\n",
     [("gift.predict.f", "(importlib) gift.fast", 2)]),
    # the target as written: an f-string's fields, any other expression's text
    ("gift.app.cli", "import importlib\n\ndef f(name):\n    importlib.import_module(f'gift.app.commands.{name}')\n",
     [("gift.app.cli.f", "(importlib) gift.app.commands.{name}", 4)]),
    ("gift", "import importlib\n\ndef f(name):\n    importlib.import_module(WHERE[name], __name__)\n",
     [("gift.f", "(importlib) WHERE[name]", 4)]),
    # not late, or not the project's
    ("gift.plan", "import gift.fast\nfrom . import config\n\nclass A:\n    from . import memory\n\n"
                  "def f():\n    import peft\n    importlib.import_module('torchao')\n    return 1\n", []),
])
def test_the_check_sees_late_project_imports_and_only_those(module, source, expected):
    """Known bad and known good sources: a function-local project import (relative or absolute, in a
    method, in a nested function) is found, and so is an import through ``import_module`` / ``__import__``
    anywhere, named by its target; top-level, class-level and third-party ones are not."""
    assert late_imports(source, module, is_package="." not in module) == expected


# ------------------------------------------------------------------------------ the contracts fail alone
def _append(path: str, line: str):
    return path, lambda text: text + line + "\n"


BREAKS_ONE_CONTRACT = {  # contract name: (file, edit) that breaks that contract and no other
    "gift_kernels never imports gift (the ops have no model knowledge)":
        _append("gift_kernels/dispatch.py", "import gift.dtypes"),
    "the library never imports the application, nor the bench (gift's __init__ included; __main__ runs the cli)":
        _append("gift/__init__.py", "from .app import cli"),
    "gift has no Triton (the kernels are gift_kernels', reached through its public ops)":
        _append("gift/memory.py", "import triton"),
    "gift: the model layer, layered (a predictor of a given model's memory never imports FastGIFT)":
        _append("gift/predict.py", "import gift  # then gift.FastGIFT in a function"),
    "gift_kernels: the developer tools on the ops on their shared math and plumbing":
        _append("gift_kernels/paca_math.py", "from . import testing"),
    "gift.app: commands on shared pieces (run configuration, training loop, data) on errors":
        _append("gift/app/run_config.py", "from .train import finetune"),
    "gift.app: no command imports another":
        ("gift/app/commands/newcmd.py", lambda text: "from . import sweep\n"),
    "gift.app.data: one --data dispatcher (the package) over the formats":
        _append("gift/app/data/images.py", "from . import benchmarks"),
}
MORE_KNOWN_BAD = [  # (file, edit), broken contract
    (("gift/__init__.py", lambda text: text.replace("    from .reference import GIFTReference\n",
                                                    "    from .reference import GIFTReference\n"
                                                    "    from .app import cli\n")),
     "the library never imports the application, nor the bench (gift's __init__ included; __main__ runs the cli)"),
    (_append("gift/dtypes.py", "import bench"),
     "the library never imports the application, nor the bench (gift's __init__ included; __main__ runs the cli)"),
    (_append("gift/predict.py", "from .fast import FastGIFT"),
     "gift: the model layer, layered (a predictor of a given model's memory never imports FastGIFT)"),
    (_append("gift/app/commands/eval.py", "from gift.app.commands import sweep"),
     "gift.app: no command imports another"),
]


def lint_imports_verdicts(root) -> dict[str, str]:
    """``{contract name: "KEPT" | "BROKEN"}`` of `lint-imports` run on the project copy in ``root``."""
    script = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([script if os.path.exists(script) else "lint-imports", "--no-cache", "--no-logo"],
                          cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "1000", "NO_COLOR": "1"})
    verdicts = {}
    for line in proc.stdout.splitlines():
        for verdict in ("KEPT", "BROKEN"):
            if f" {verdict}" in line:
                verdicts[line.split(f" {verdict}")[0].strip()] = verdict
    assert verdicts, proc.stdout + proc.stderr
    return verdicts


def copy_with(tmp_path, path: str, edit) -> str:
    """The project's packages and pyproject.toml (their Python files) in ``tmp_path``, ``path`` edited."""
    for top in PROJECT:
        shutil.copytree(os.path.join(ROOT, top), tmp_path / top,
                        ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or
                                                                          os.path.isdir(os.path.join(d, n)))
                                                 or n == "__pycache__"])
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    target = tmp_path / path
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    edited = edit(text)
    assert edited != text, f"the edit of {path} changes nothing"
    target.write_text(edited, encoding="utf-8")
    return str(tmp_path)


def test_every_contract_is_one_the_known_bad_cases_break():
    names = [c["name"] for c in pyproject()["tool"]["importlinter"]["contracts"]]
    assert sorted(names) == sorted(BREAKS_ONE_CONTRACT)


@pytest.mark.parametrize("name", sorted(BREAKS_ONE_CONTRACT))
def test_each_contract_fails_on_its_own_on_a_known_bad_copy(tmp_path, name):
    """A contract that no known-bad import breaks alone would be implied by the others (or by nothing)."""
    verdicts = lint_imports_verdicts(copy_with(tmp_path, *BREAKS_ONE_CONTRACT[name]))
    assert {n for n, v in verdicts.items() if v == "BROKEN"} == {name}


@pytest.mark.parametrize("change, name", MORE_KNOWN_BAD, ids=[c[0] for c, _ in MORE_KNOWN_BAD])
def test_more_known_bad_imports_break_their_contract(tmp_path, change, name):
    assert lint_imports_verdicts(copy_with(tmp_path, *change))[name] == "BROKEN"


def test_the_project_itself_keeps_every_contract():
    verdicts = lint_imports_verdicts(ROOT)
    assert set(verdicts.values()) == {"KEPT"} and len(verdicts) == len(BREAKS_ONE_CONTRACT), verdicts
