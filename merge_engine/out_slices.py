"""The recipe's output layers as slices: which source layer of which model feeds each output
layer, with the parameters and base model in force there.

A ``models:`` recipe is one slice spanning every layer; a ``slices:`` recipe has one per entry.
The planner walks these slices to name each output tensor's source tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from merge_engine.io.refs import ModelRef
from merge_engine.methods.spec import MethodSpec
from merge_engine.recipe import MergeRecipe, Module


@dataclass
class Source:
    """One model feeding a slice; its layer ``first_layer`` becomes the slice's first layer."""

    model: ModelRef
    first_layer: int
    params: Mapping[str, Any] | None


@dataclass
class OutSlice:
    """``num_layers`` consecutive output layers merged from ``sources``."""

    sources: list[Source]
    num_layers: int
    params: Mapping[str, Any] | None
    base: ModelRef | None  # the slice's own base_model, else the recipe's
    module_params: Mapping[str, Any] | None = None  # its module's parameters (``modules:`` recipes)


def out_slices(recipe: MergeRecipe, num_layers: int, module: Module | None = None) -> list[OutSlice]:
    """The output slices of ``recipe``, or of one ``module`` of it (``num_layers``: the
    reference's layer count there, the span of a ``models:`` list)."""
    models, slices = (module.models, module.slices) if module is not None else (recipe.models, recipe.slices)
    params = module.parameters if module is not None else None
    if models is not None:
        sources = [Source(m.model, 0, m.parameters) for m in models]
        base = recipe.base_model
        if base is not None and all(m.model != base for m in models):
            sources.append(Source(base, 0, None))  # as mergekit: an unlisted base is one more input
        return [OutSlice(sources, num_layers, None, base, params)]
    return [OutSlice([Source(s.model, s.layer_range[0], s.parameters) for s in sl.sources],
                     sl.num_layers, sl.parameters, recipe.base_of(sl), params) for sl in slices or ()]


def out_of_bounds(slices: list[OutSlice], layer_counts: Mapping[ModelRef, int]) -> list[str]:
    """One problem per source whose layers run past its model's ``layer_counts``."""
    problems = []
    for sl in slices:
        for src in sl.sources:
            end, n_src = src.first_layer + sl.num_layers, layer_counts[src.model]
            if end > n_src:
                problems.append(f"layer_range [{src.first_layer}, {end}) is out of bounds for "
                                f"{src.model}, which has {n_src} layers")
    return problems


def split_base(spec: MethodSpec, sl: OutSlice) -> tuple[list[Source], Source | None]:
    """Separate the slice's base model from its other inputs, as the method's ``base`` rule says.

    Counts and a missing required base were checked by ``validate.check_recipe``."""
    sources = sl.sources
    if spec.base == "unused" or sl.base is None:
        return sources, None
    others = [s for s in sources if s.model != sl.base]
    base = next((s for s in sources if s.model == sl.base), None)
    if base is None:  # a base not listed is added, aligned with the slice's first source
        first = sources[0].first_layer if sources else 0
        base = Source(sl.base, first, None)
    return others, base
