"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers.

The public names load on first use, so that ``gift --help`` answers without importing torch or timm.
``gift.models`` (imported with any of them) registers gift's small timm models.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"
__all__ = ["ClusterMaps", "FastGIFT", "GIFTConfig", "GIFTReference", "explain"]
_WHERE = {"ClusterMaps": ".explain", "explain": ".explain", "FastGIFT": ".fast", "GIFTConfig": ".config",
          "GIFTReference": ".reference"}


def __getattr__(name: str):
    if name in _WHERE:
        importlib.import_module(".models", __name__)
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Keeps ``gift.explain`` the function (as ``from gift import explain`` always gave) when the
    ``gift.explain`` submodule is imported after it: the import system sets the submodule on its package."""

    def __setattr__(self, name: str, value) -> None:
        if name == "explain" and isinstance(value, types.ModuleType):
            value = value.explain
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
