"""The one list of merge methods. Add a method by writing its file and listing its SPEC here."""

from __future__ import annotations

import difflib

from merge_engine.errors import UnknownMethodError
from merge_engine.methods import (arcee_fusion, breadcrumbs, dare, della, karcher, linear,
                                  model_stock, multislerp, nearswap, nuslerp, passthrough, ram, sce,
                                  slerp, task_arithmetic, ties)
from merge_engine.methods.spec import MethodSpec

METHODS: tuple[MethodSpec, ...] = (
    linear.SPEC,
    slerp.SPEC,
    nuslerp.SPEC,
    multislerp.SPEC,
    task_arithmetic.SPEC,
    ties.SPEC,
    dare.SPEC_LINEAR,
    dare.SPEC_TIES,
    breadcrumbs.SPEC,
    breadcrumbs.SPEC_TIES,
    della.SPEC,
    della.SPEC_LINEAR,
    model_stock.SPEC,
    sce.SPEC,
    karcher.SPEC,
    passthrough.SPEC,
    arcee_fusion.SPEC,
    nearswap.SPEC,
    ram.SPEC,
    ram.SPEC_PLUS_TL,
)

_BY_NAME: dict[str, MethodSpec] = {}
for _spec in METHODS:
    for _name in (_spec.name, *_spec.aliases):
        if _name in _BY_NAME:
            raise RuntimeError(f"merge method name {_name!r} is declared twice")
        _BY_NAME[_name] = _spec


def method_names() -> list[str]:
    """Canonical names of all methods, in declaration order."""
    return [spec.name for spec in METHODS]


def get_method(name: str) -> MethodSpec:
    """The method called ``name`` (or one of its aliases); UnknownMethodError suggests close names."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name).lower(), list(_BY_NAME), n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"known methods: {', '.join(method_names())}")
    raise UnknownMethodError(f"unknown merge_method {name!r}; {hint}")
