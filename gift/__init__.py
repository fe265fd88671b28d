"""GIFT: Generative Interpretable Fine-tuning Transformers, for timm Vision Transformers."""
from .config import GIFTConfig
from .fast import FastGIFT
from .reference import GIFTReference

__all__ = ["FastGIFT", "GIFTConfig", "GIFTReference"]
__version__ = "0.1.0"
