"""The one table of dtype names: torch's names (``bfloat16``, as ``--backbone-dtype`` and timm's
``--amp-dtype`` spell them) with their short aliases (``bf16``, still accepted wherever a name is
read), and the one autocast helper."""
from __future__ import annotations

import torch

#: name -> torch dtype, in torch's spelling
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
#: short alias -> name
ALIASES: dict[str, str] = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}
#: the dtypes autocast runs in
AUTOCAST_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
#: how a frozen backbone may be stored: a dtype, or "nf4" (4-bit NF4 linear weights, `gift.nf4`)
BACKBONE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "nf4")


def dtype_name(text: str) -> str:
    """The name of a dtype given by name or alias (``"bf16"`` -> ``"bfloat16"``); ``ValueError`` otherwise."""
    name = ALIASES.get(text, text)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; choose one of {', '.join(DTYPES)} "
                         f"(or {', '.join(ALIASES)})")
    return name


def expand_alias(text: str) -> str:
    """``"bf16"`` -> ``"bfloat16"`` (any alias to its name); any other text as it is, for the caller to check
    (an argparse type, so that ``choices`` names the allowed values)."""
    return ALIASES.get(text, text)


def torch_dtype(text: str) -> torch.dtype:
    """The torch dtype of a name or alias."""
    return DTYPES[dtype_name(text)]


def backbone_cast_dtype(backbone_dtype: str) -> torch.dtype | None:
    """What the frozen backbone weights are cast to for a `BACKBONE_DTYPES` name: None for float32 (left as
    they are), bfloat16 for nf4 (the weights NF4 leaves unquantized), else that dtype."""
    name = expand_alias(backbone_dtype)
    if name == "nf4":
        return torch.bfloat16
    return None if name == "float32" else torch_dtype(name)


def short_name(dtype: torch.dtype | str) -> str:
    """The alias of a dtype or name (``torch.bfloat16`` -> ``"bf16"``), for table headers."""
    name = str(dtype).replace("torch.", "")
    return next((alias for alias, n in ALIASES.items() if n == name), name)


def autocast_for(device: torch.device | str, dtype: torch.dtype | str | None) -> torch.autocast:
    """``torch.autocast`` on ``device`` in ``dtype`` (bfloat16/float16, a torch dtype or a name); for None
    and the other dtypes autocast switched off (also inside an outer autocast)."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    enabled = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(torch.device(device).type, dtype=dtype if enabled else None, enabled=enabled)
