"""Mutated copies of Triton kernels, built from their source text, for tests that prove a check sees a wrong kernel.

`mutated_kernels(module, edits)` returns copies of ``module``'s ``@triton.jit`` functions (their decorators, e.g.
``@triton.heuristics``, included) with each edit's ``old`` text replaced by its ``new`` text; ``old`` must occur
exactly once in that function's source, so a refactor of the kernel fails the test that uses the edit loudly
instead of leaving it to test nothing. The copies are executed in a copy of the module's namespace (the module
itself is left as it is) and their source is registered with `linecache`, so that the interpreter
(``TRITON_INTERPRET=1``), which rewrites a kernel from its source, can read it. `mutated` installs them in the
module for the duration of a ``with`` block, so that the module's launchers, which look kernels up by name at
call time, launch the copies.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import linecache
import textwrap
from dataclasses import dataclass
from types import ModuleType

_COPIES = itertools.count()


@dataclass(frozen=True)
class Edit:
    """In the source of ``module.<kernel>``, the one occurrence of ``old`` becomes ``new``."""

    kernel: str
    old: str
    new: str


def _python_function(kernel):
    """The plain Python function under ``@triton.heuristics`` / ``@triton.jit`` wrappers (each keeps it in ``.fn``)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def kernel_source(module: ModuleType, name: str) -> str:
    """The source text of ``module.<name>``, decorators included, dedented."""
    return textwrap.dedent(inspect.getsource(_python_function(getattr(module, name))))


def mutated_kernels(module: ModuleType, edits: list[Edit]) -> dict:
    """``{kernel name: mutated copy}`` for every kernel ``edits`` name (see the module docstring)."""
    sources: dict[str, str] = {}
    for edit in edits:
        src = sources.get(edit.kernel) or kernel_source(module, edit.kernel)
        count = src.count(edit.old)
        if count != 1:
            raise AssertionError(f"{module.__name__}.{edit.kernel}: the mutation's pattern occurs {count} times "
                                 f"(expected exactly once); re-target it at the kernel's new text:\n{edit.old}")
        sources[edit.kernel] = src.replace(edit.old, edit.new)
    namespace = dict(vars(module))
    copies = {}
    for name, src in sources.items():
        filename = f"<mutated {module.__name__}.{name} #{next(_COPIES)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
        exec(compile(src, filename, "exec"), namespace)
        copies[name] = namespace[name]
    return copies


@contextlib.contextmanager
def mutated(module: ModuleType, edits: list[Edit]):
    """Within the block, ``module``'s kernels named by ``edits`` are their mutated copies."""
    copies = mutated_kernels(module, edits)
    originals = {name: getattr(module, name) for name in copies}
    try:
        for name, copy in copies.items():
            setattr(module, name, copy)
        yield copies
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
