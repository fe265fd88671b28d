"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers."""
from .config import GIFTConfig
from .reference import GIFTReference

__all__ = ["GIFTConfig", "GIFTReference"]
__version__ = "0.1.0"
