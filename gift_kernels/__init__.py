"""Fused ops for GIFT, free of model knowledge: each op is a torch path plus (where it pays) Triton kernels.

Layers, each importing only those below it: `dev` (developer tools: compile check, launch counts) >
`testing` (op inputs and end-to-end checks for tests and bench) > the ops `paca`, `residual`, `mlp` > their Triton
kernels `paca_triton`, `residual_triton` > `agreement` (the tolerance table and how results are compared with an
exact answer: tests, bench and dispatch's first-use check) > `paca_math` (what the PaCa ops share), `launch` (launch
configurations) > `dispatch` (the backend choice) > `files` (atomic writes, README blocks: `gift` writes
through it too). Nothing here imports `gift`.
"""
from .dispatch import active_backend, resolve_backend, triton_available
from .mlp import l2_mlp_residual, l2_mlp_residual_reference
from .paca import paca_attention
from .paca_math import PacaParams, paca_attention_reference
from .residual import lowrank_residual_linear, lowrank_residual_linear_reference

__all__ = [
    "active_backend",
    "resolve_backend",
    "triton_available",
    "PacaParams",
    "l2_mlp_residual",
    "l2_mlp_residual_reference",
    "lowrank_residual_linear",
    "lowrank_residual_linear_reference",
    "paca_attention",
    "paca_attention_reference",
]
