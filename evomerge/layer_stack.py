"""Grow or shrink the resident model's decoder layer list to the layer count of each recipe.

A layer-path search (:mod:`evomerge.space.layer_path`) proposes models of different depths, yet
keeps one model in memory: before a recipe is written into it, :class:`LayerStack` makes the
model's layer list and config declare the recipe's output layer count.

Layers dropped by a shallower recipe are kept aside, not freed, and put back at the same index by
a deeper one: their tensors (and the in-place merger's record of what it wrote into them) stay
valid, so only changed tensors are recomputed. An index never seen before gets a copy of the
layer at its source position (same module type and per-layer settings, e.g. sliding windows),
whose tensors the merge then overwrites. Per-layer config lists (``layer_types``) follow the
layers they came from, as the merged config on disk does.

Lifecycle: one per :class:`~evomerge.candidate.Candidate`, built at its first ``slices`` recipe;
:meth:`resize` before every apply. Not for models split over several devices by a device map.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from merge_engine.errors import MergeError
from merge_engine.layout import LAYER_COUNT_KEYS, detect_layout
from merge_engine.recipe import MergeRecipe


class LayerStack:
    """The decoder layer list (``torch.nn.ModuleList``) of ``model`` and its layer-count config."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layers = _layer_list(model)
        self.native = len(self.layers)
        self.original = list(self.layers)  # templates: the module type of each source position
        self.native_types = list(getattr(getattr(model, "config", None), "layer_types", None) or []) or None
        self.spare: dict[int, torch.nn.Module] = {}

    def sources(self, recipe: MergeRecipe) -> list[int]:
        """The source layer index of every output layer of ``recipe``."""
        if recipe.slices is None:
            return list(range(self.native))
        return [sl.sources[0].layer_range[0] + i for sl in recipe.slices for i in range(sl.num_layers)]

    def resize(self, recipe: MergeRecipe) -> bool:
        """Make the model hold ``recipe``'s output layer count; True when the list changed."""
        if not self.layers:  # no stack found: the merger reports any mismatch by name
            return False
        sources = self.sources(recipe)
        n, current = len(sources), len(self.layers)
        if self.native_types is not None:  # follows the source positions even at the same depth
            self.model.config.layer_types = [self.native_types[min(s, self.native - 1)] for s in sources]
        if n == current:
            return False
        for i in range(n, current):
            self.spare[i] = self.layers[i]
        del self.layers[n:]
        for i in range(current, n):
            layer = self.spare.pop(i, None)
            if layer is None:
                layer = copy.deepcopy(self.original[min(sources[i], self.native - 1)])
                _renumber(layer, i)
            self.layers.append(layer)
        _set_layer_count(self.model.config, n)
        return True


def _layer_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layer list, found from its tensor names; empty when it has none."""
    config = getattr(model, "config", None)
    try:
        layout = detect_layout(list(model.state_dict().keys()), config.to_dict() if config is not None else {})
        layers = model.get_submodule(layout.prefix.rstrip(".")) if layout.num_layers else None
    except (MergeError, AttributeError):
        layers = None
    return layers if isinstance(layers, torch.nn.ModuleList) else torch.nn.ModuleList()


def _renumber(layer: torch.nn.Module, index: int) -> None:
    """Give every submodule that knows its layer index (attention caches use it) ``index``."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index


def _set_layer_count(config: Any, n: int) -> None:
    for scope in (config, getattr(config, "text_config", None)):
        for key in LAYER_COUNT_KEYS:
            if scope is not None and isinstance(getattr(scope, key, None), int):
                setattr(scope, key, n)
