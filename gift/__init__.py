"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers."""
from . import models  # noqa: F401  (registers gift's small timm models)
from .config import GIFTConfig
from .explain import ClusterMaps, explain
from .fast import FastGIFT
from .reference import GIFTReference

__all__ = ["ClusterMaps", "FastGIFT", "GIFTConfig", "GIFTReference", "explain"]
__version__ = "0.1.0"
