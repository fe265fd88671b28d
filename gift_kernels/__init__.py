"""Fused ops for GIFT, free of model knowledge: each op is a torch path plus (where it pays) Triton kernels."""
from .residual import lowrank_residual_linear, lowrank_residual_linear_reference

__all__ = ["lowrank_residual_linear", "lowrank_residual_linear_reference"]
