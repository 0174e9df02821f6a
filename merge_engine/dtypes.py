"""The one table of floating-point dtypes a recipe may compute or write in, and a model may be
loaded in.

Recipes, configs and the CLI name dtypes as strings (``bfloat16``, or aliases such as ``bf16``);
the engine computes with ``torch.dtype``. Every conversion between the two goes through here.
The names need no torch import (the CLI offers them as choices before torch is loaded).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# canonical names, in the order messages list them
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
# what a model is loaded and evaluated in (search spaces, eval configs, the zoo)
MODEL_DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "float": "float32", "single": "float32"}


def canonical_dtype_name(name: str) -> str:
    """``name`` or its alias (``bf16``, ``fp16``, ``half``, ...) as a canonical name; ValueError if unknown."""
    canonical = _ALIASES.get(name, name)
    if canonical not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return canonical


@cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (an alias is accepted); ValueError if unknown."""
    import torch

    return getattr(torch, canonical_dtype_name(name))


def dtype_name(dtype: torch.dtype) -> str | None:
    """The canonical name of ``dtype``, or None for dtypes outside the table (integers, fp8...)."""
    return next((name for name in DTYPE_NAMES if torch_dtype(name) == dtype), None)
