"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers.

The public names load on first use, so that ``gift --help`` answers without importing torch or timm;
with any of them, `gift.timm_models` registers gift's small timm models.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["ClusterMaps", "FastGIFT", "GIFTConfig", "GIFTReference", "explain"]
_WHERE = {"ClusterMaps": ".explainer", "explain": ".explainer", "FastGIFT": ".fast", "GIFTConfig": ".config",
          "GIFTReference": ".reference"}


def __getattr__(name: str):
    if name in _WHERE:
        importlib.import_module(".timm_models", __name__)
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
