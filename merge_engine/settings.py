"""How one parameter setting of a recipe resolves for one tensor: gradients (a list of values
spread over the layers, piecewise linear), filters (``[{filter: self_attn, value: ...}, ...]``,
first match by substring) and the levels a value may be set at (source, slice, module, recipe;
the most specific wins), as mergekit resolves them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from merge_engine.recipe import FilterEntry


def layer_position(i: int, n: int) -> float:
    """Where layer ``i`` of ``n`` sits on a gradient (0 at the first layer, 1 at the last; a
    single layer sits at 1), as mergekit places it."""
    return i / (n - 1) if n > 1 else 1.0


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def gradient_value(values: Sequence[Any], t: float) -> Any:
    """Value of a gradient at position ``t`` in [0, 1] (piecewise linear over numbers)."""
    n = len(values)
    if n == 1:
        return values[0]
    if not all(_is_number(v) for v in values):
        return values[int(t * (n - 1))]
    s = t * (n - 1)
    i = min(int(math.floor(s)), n - 1)
    f = s - i
    j = min(i + 1, n - 1)
    if f == 0:
        return values[i]
    return (1 - f) * values[i] + f * values[j]


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Evaluate one parameter setting for a tensor at layer position ``t`` (MISSING if no filter matches)."""
    if isinstance(setting, list):
        if setting and isinstance(setting[0], FilterEntry):
            for entry in setting:
                if entry.filter is None or entry.filter == "*" or entry.filter in tensor_name:
                    return evaluate_setting(entry.value, tensor_name, t)
            return MISSING
        return gradient_value(setting, t)
    return setting


def resolve(levels: Sequence[Mapping[str, Any] | None], name: str, tensor_name: str, t: float) -> Any:
    """First value set for ``name`` along ``levels`` (most specific first), or MISSING."""
    for params in levels:
        if params and name in params:
            value = evaluate_setting(params[name], tensor_name, t)
            if value is not MISSING:
                return value
    return MISSING
