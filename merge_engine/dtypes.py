"""The one table of floating-point dtypes a recipe may compute or write in.

Recipes, configs and the CLI name dtypes as strings (``bfloat16``, or aliases such as ``bf16``);
the engine computes with ``torch.dtype``. Every conversion between the two goes through here.
"""

from __future__ import annotations

import torch

# canonical name -> torch dtype, in the order messages list them
_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "float": "float32", "single": "float32"}
_NAME_OF = {dtype: name for name, dtype in _BY_NAME.items()}

DTYPE_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def canonical_dtype_name(name: str) -> str:
    """``name`` or its alias (``bf16``, ``fp16``, ``half``, ...) as a canonical name; ValueError if unknown."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _BY_NAME:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return canonical


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (an alias is accepted); ValueError if unknown."""
    return _BY_NAME[canonical_dtype_name(name)]


def dtype_name(dtype: torch.dtype) -> str | None:
    """The canonical name of ``dtype``, or None for dtypes outside the table (integers, fp8...)."""
    return _NAME_OF.get(dtype)
