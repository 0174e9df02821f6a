"""Declarations of merge methods: the one source of truth for their parameters.

A method is a pure function over tensors plus a :class:`MethodSpec` that says
which parameters it takes, whether each is global or per-model, its default,
its valid range and a sensible search range. The recipe validator, the planner,
the search-space builder and the results writer all read these declarations.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Literal

import torch

ParamKind = Literal["float", "int", "bool"]
BaseUse = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters are resolved once per input model (a list aligned
    with the method's ``tensors`` argument); global ones once per tensor.
    ``default=None`` with ``required=True`` means the recipe must set it.
    ``low``/``high`` bound valid values (inclusive); ``search`` is the range a
    search space uses when the user gives none.
    """

    name: str
    per_model: bool
    default: float | int | bool | None = None
    required: bool = False
    kind: ParamKind = "float"
    low: float | None = None
    high: float | None = None
    search: tuple[float, float] | None = None
    help: str = ""

    @property
    def kwarg(self) -> str:
        """Python keyword-argument name (``lambda`` becomes ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def check(self, value: object) -> str | None:
        """Return a problem description for ``value``, or None when valid."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                return f"{self.name} must be true or false, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name} must be a number, got {value!r}"
        if not math.isfinite(float(value)):
            return f"{self.name} must be finite, got {value!r}"
        if self.kind == "int" and int(value) != value:
            return f"{self.name} must be a whole number, got {value!r}"
        if self.low is not None and value < self.low:
            return f"{self.name} must be >= {self.low}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"{self.name} must be <= {self.high}, got {value!r}"
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its function and its declared interface.

    ``fn(tensors, base, **params)`` receives the non-base input tensors (all of
    one shape, already in the compute dtype and on the compute device), the
    base tensor or None, each per-model parameter as a list aligned with
    ``tensors``, each global parameter as a scalar, and ``rng`` (a
    :class:`merge_engine.randomness.TensorRandom`) when ``random`` is true.
    It returns one tensor of the same shape.

    ``base``: "required" — the recipe must name a base model, which is passed
    as ``base`` and excluded from ``tensors``; "optional" — same when given;
    "unused" — a listed base model is just another input in ``tensors``.

    ``draws`` (random methods): given ``fn``'s keyword arguments, the draws of the tensor's
    shape ``fn`` will ask ``rng`` for, as ``(model index, None)`` for ``rng.uniform`` or
    ``(model index, p)`` for ``rng.keep_mask(p)``; the engine makes them ahead of time on its
    I/O thread (same values). None: ``fn`` draws when it needs to.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: BaseUse
    description: str
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    embed_rows: Literal["common", "base"] = "common"
    draws: Callable[[dict[str, Any]], Sequence[tuple[int, float | None]]] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def input_problems(self, n_inputs: int, has_base: bool, *, add_base: str = "add a base_model",
                       fix_count: str = "adjust the models listed") -> list[str]:
        """What stops this method from merging ``n_inputs`` models, given whether a base is named.

        ``n_inputs`` counts the models merged besides the base this method uses (so with
        ``base="unused"`` a named base is one of them, if the caller merges it). Each problem is
        one line ending in the caller's fix, ``add_base`` or ``fix_count``, so the recipe
        validator and the search space each say it in their own terms (``"ties needs a
        base_model; <add_base>"``, ``"slerp merges exactly 1 model(s) besides a base, got 2;
        <fix_count>"``). Empty when the count and the base are fine.
        """
        problems = []
        if self.base == "required" and not has_base:
            problems.append(f"{self.name} needs a base_model; {add_base}")
        if n_inputs < self.min_models or (self.max_models is not None and n_inputs > self.max_models):
            want = (f"exactly {self.min_models}" if self.max_models == self.min_models
                    else f"at least {self.min_models}" if self.max_models is None
                    else f"{self.min_models} to {self.max_models}")
            besides = " besides a base" if has_base and self.base != "unused" else ""
            problems.append(f"{self.name} merges {want} model(s){besides}, got {n_inputs}; {fix_count}")
        return problems

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)
