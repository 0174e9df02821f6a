"""The output model's config.json: the reference's, with the layer counts, dtype and vocabulary
size of what the plan writes."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from merge_engine.dtypes import dtype_name
from merge_engine.layout import LayerLayout, with_num_layers
from merge_engine.modules import set_config_value
from merge_engine.out_slices import OutSlice
from merge_engine.recipe import MergeRecipe


def output_config(recipe: MergeRecipe, reference: Mapping[str, Any], layout: LayerLayout, num_layers: int,
                  slices: list[OutSlice], shapes: list[tuple[str, tuple[int, ...], torch.dtype, int | None]],
                  vocab_rows: int | None, module_layers: Mapping[str, int]) -> dict[str, Any]:
    """``reference`` (its config) rewritten for the output: ``num_layers`` layers in the main
    stack ``layout`` (built from ``slices``), ``module_layers`` at each other module's dotted
    layer-count key, the dtype most weights are written in (unless the recipe sets one), and the
    vocabulary size (``vocab_rows`` of the output tokenizer, else the cropped embedding rows).
    ``shapes``: (name, shape, dtype, cropped rows or None) of every output tensor."""
    config = with_num_layers(copy.deepcopy(dict(reference)), num_layers)
    # per-layer lists (e.g. layer_types, at the top or in text_config) follow the layers they came from
    for scope in (config, config.get("text_config")):
        for key, value in list(scope.items()) if isinstance(scope, dict) else ():
            if isinstance(value, list) and len(value) == layout.num_layers and num_layers != len(value) \
                    and key not in ("architectures",):
                scope[key] = [value[min(s.sources[0].first_layer + i, len(value) - 1)]
                              for s in slices for i in range(s.num_layers)]
    for key, count in module_layers.items():
        set_config_value(config, key, count)
    # unset: the dtype most of the output's weights are written in
    sizes: dict[torch.dtype, int] = {}
    for _, shape, dtype, _ in shapes:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    most = max(sizes, key=sizes.__getitem__) if sizes else None
    out_dtype = recipe.out_dtype or recipe.dtype or (most and dtype_name(most))
    if out_dtype:
        config["torch_dtype"] = out_dtype
        if "dtype" in config:
            config["dtype"] = out_dtype
    crop = next((rows for name, _, _, rows in shapes if layout.is_embedding(name)), None)
    rows = vocab_rows if vocab_rows is not None else crop
    if rows is not None:
        set_config_value(config, "vocab_size" if "vocab_size" in config else "text_config.vocab_size", rows)
    return config
