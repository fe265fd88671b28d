"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers.

The public names load on first use, so that ``gift --help`` answers without importing torch or timm;
with any of them, `gift.timm_models` registers gift's small timm models.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ClusterMaps", "FastGIFT", "GIFTConfig", "GIFTReference", "explain"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'gift' has no attribute {name!r}")
    # plain imports, not importlib: lint-imports sees what the package reaches
    from . import timm_models  # noqa: F401  (registers gift's small timm models)
    from .config import GIFTConfig
    from .explainer import ClusterMaps, explain
    from .fast import FastGIFT
    from .reference import GIFTReference

    globals().update(ClusterMaps=ClusterMaps, FastGIFT=FastGIFT, GIFTConfig=GIFTConfig, GIFTReference=GIFTReference,
                     explain=explain)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
