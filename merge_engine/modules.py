"""Multi-module models (a vision-language model's text decoder, vision tower and projector):
which tensors form each module, and each module's own layer stack.

A recipe's ``modules: {NAME: {models | slices}}`` merges each module on its own, with mergekit
0.1.5's module names; ``models:`` merges every module from the same list, and ``slices:`` is
refused where a model has more than one module (mergekit refuses it too: a layer range cannot say
which stack it cuts). A model without a row in :data:`MODULES` is one module, ``default``.

Why a table: the names (``vision_tower`` ...) are mergekit's and appear in no checkpoint, and
where one module ends and the next begins (Qwen2-VL's ``visual.merger.`` projector inside its
``visual.`` tower) is not visible in tensor names either. A row says only that: the name
prefixes of each module's tensors, the config key of its layer count, and which of its tensors
outside its stack come after the stack. The stack itself is found from names, as for any model
(:func:`merge_engine.layout.detect_layout`, checked against that config key).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from merge_engine.errors import CheckpointError, RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.layout import LayerLayout, detect_layout, is_output_head
from merge_engine.out_slices import OutSlice, out_slices
from merge_engine.recipe import MergeRecipe, Module

DEFAULT = "default"


@dataclass(frozen=True)
class ModuleDef:
    """One named module of an architecture: its tensors are those whose names start with one of
    ``prefixes`` (the first module that matches owns a tensor); ``layers_key`` is the dotted
    config key of its layer count (None: no layer count in config); ``after`` are name fragments
    of its tensors outside the stack that follow the stack (None: the text rule, everything but
    the input embeddings); ``last`` are name fragments of tensors at gradient position 1, not 0
    (mergekit's Qwen2-VL projector lists its MLP as a layer without an index, planned once for
    each of its two fixed layers: the second write, at the last layer, is the one kept)."""

    prefixes: tuple[str, ...]
    layers_key: str | None = None
    after: tuple[str, ...] | None = None
    last: tuple[str, ...] = ()


_QWEN2_VL = {  # hub checkpoints name the text decoder model.*, the vision side visual.*
    "text_decoder": ModuleDef(("model.", "lm_head."), "text_config.num_hidden_layers"),
    "multi_modal_projector": ModuleDef(("visual.merger.",), after=(), last=("visual.merger.mlp.",)),
    "vision_tower": ModuleDef(("visual.",), "vision_config.depth", after=()),
}
_LLAVA_LIKE = {  # language_model.*, vision_tower.*, multi_modal_projector.*
    "text_decoder": ModuleDef(("language_model.",), "text_config.num_hidden_layers"),
    "multi_modal_projector": ModuleDef(("multi_modal_projector.",), after=()),
    "vision_tower": ModuleDef(("vision_tower.",), "vision_config.num_hidden_layers", after=("post_layernorm.",)),
}
_QWEN3_VL = {  # everything under model.language_model.* / model.visual.*; deepstack mergers are layers
    "text_decoder": ModuleDef(("model.language_model.", "lm_head."), "text_config.num_hidden_layers"),
    "multi_modal_projector": ModuleDef(("model.visual.merger.", "model.visual.deepstack_merger_list."), after=()),
    "vision_tower": ModuleDef(("model.visual.",), "vision_config.depth", after=()),
}
MODULES: dict[str, dict[str, ModuleDef]] = {
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Mistral3ForConditionalGeneration": _LLAVA_LIKE,
    "Gemma3ForConditionalGeneration": _LLAVA_LIKE,
}


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of ``config``, or None; a ``text_config.`` key that is missing
    there is read at the top level, where older configs (hub Qwen2-VL) keep the text settings."""
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None and key.startswith("text_config."):
        return config_value(config, key.removeprefix("text_config."))
    return value


def set_config_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` of ``config`` in place where it exists (nested dicts are copied first)."""
    head, _, rest = key.partition(".")
    if not rest:
        if head in config:
            config[head] = value
        return
    if isinstance(config.get(head), Mapping):
        config[head] = dict(config[head])
        set_config_value(config[head], rest, value)


@dataclass(frozen=True)
class ModelModule:
    """One module as one checkpoint holds it: its tensor names (checkpoint order) and stack."""

    name: str
    names: tuple[str, ...]
    layout: LayerLayout
    spec: ModuleDef | None  # None: the whole model (``default``)

    def after_stack(self, name: str, whole: LayerLayout) -> bool:
        """True when tensor ``name`` (outside the stack) follows the stack: merged with the last
        slice's sources, as mergekit's post-weights are; False: with the first slice's."""
        after = self.spec.after if self.spec is not None else None
        if after is None:
            return not (whole.is_embedding(name) and not is_output_head(name))
        return any(part in name for part in after)

    def position(self, name: str) -> float:
        """The gradient position of tensor ``name`` outside the stack (0, or 1 for ``spec.last``)."""
        return 1.0 if self.spec is not None and any(part in name for part in self.spec.last) else 0.0


def architecture(config: Mapping[str, Any]) -> str:
    """The config's first ``architectures`` entry (else its ``model_type``): the key of MODULES."""
    archs = config.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else str(config.get("model_type", "?"))


def model_modules(names: tuple[str, ...], config: Mapping[str, Any],
                  whole: LayerLayout) -> tuple[dict[str, ModelModule], list[str]]:
    """The modules of one checkpoint, and the tensors no module owns (mergekit writes none of
    those). Raises CheckpointError when a module's stack disagrees with its config key."""
    table = MODULES.get(architecture(config))
    if table is None:
        return {DEFAULT: ModelModule(DEFAULT, tuple(names), whole, None)}, []
    owned: dict[str, list[str]] = {m: [] for m in table}
    outside = []
    for name in names:
        owner = next((m for m, d in table.items() if name.startswith(d.prefixes)), None)
        (owned[owner] if owner else outside).append(name)
    out = {}
    for module, spec in table.items():
        count = config_value(config, spec.layers_key) if spec.layers_key else None
        try:
            layout = detect_layout(owned[module], {"num_layers": count} if isinstance(count, int) else {})
        except CheckpointError as err:
            raise CheckpointError(f"module {module}: {err}") from None
        out[module] = ModelModule(module, tuple(owned[module]), layout, spec)
    return out, outside


@dataclass
class ModulePlan:
    """What the planner walks for one output module: its slices and each model's stack in it."""

    name: str
    slices: list[OutSlice]
    stacks: dict[ModelRef, LayerLayout]
    reference: ModelModule  # the module as the reference model holds it

    @property
    def layers_key(self) -> str | None:
        """The dotted config key of this module's layer count (None: the main stack's keys)."""
        return self.reference.spec.layers_key if self.reference.spec is not None else None


def module_plans(recipe: MergeRecipe, readers: Mapping[ModelRef, Any], reference: ModelRef,
                 layouts: Mapping[ModelRef, LayerLayout], warnings: list[str]) -> list[ModulePlan]:
    """The output modules of ``recipe`` in the reference's module order; every problem (a module
    the models lack, one left out, ``slices`` where modules must be named) in one RecipeError."""
    found: dict[ModelRef, dict[str, ModelModule]] = {}
    problems: list[str] = []
    for ref, reader in readers.items():
        try:
            found[ref], outside = model_modules(reader.tensor_names, reader.config, layouts[ref])
        except CheckpointError as err:
            problems.append(f"model {ref}: {err}")
            continue
        if ref == reference and outside:
            more = f" (+{len(outside) - 3} more)" if len(outside) > 3 else ""
            warnings.append(f"tensors {', '.join(outside[:3])}{more} belong to no module of "
                            f"{architecture(reader.config)} and are not written (as mergekit does)")
    if problems:
        raise RecipeError(problems)
    ref_modules = found[reference]
    arch, names = architecture(readers[reference].config), list(ref_modules)
    if recipe.modules is None:
        if recipe.slices is not None and len(ref_modules) > 1:
            raise RecipeError(f"{arch} has modules {', '.join(names)}: 'slices' cannot say which one it "
                              f"cuts; write them under 'modules: {{{names[0]}: {{slices: ...}}}}' "
                              "and give the other modules 'models' (mergekit requires it too)")
        wanted = {name: Module(models=recipe.models, slices=recipe.slices) for name in names}
    else:
        wanted = dict(recipe.modules)
        for name in wanted:
            if name not in ref_modules:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"its modules are {', '.join(names)}"
                problems.append(f"modules.{name}: {arch} has no module '{name}'; {hint}")
        left = [n for n in names if n not in wanted]
        if left and not problems:
            problems.append(f"modules does not name {', '.join(left)} of {arch}: mergekit would write a "
                            f"model without them; add each (e.g. '{left[0]}: {{models: [...]}}')")
        if problems:
            raise RecipeError(problems)
    plans = []
    for name in names:
        module = ref_modules[name]
        slices = out_slices(recipe, module.layout.num_layers, wanted[name])
        plans.append(ModulePlan(name, slices, {ref: mods[name].layout for ref, mods in found.items()}, module))
    return plans
