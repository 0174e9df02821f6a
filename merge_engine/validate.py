"""The checks of a recipe that need no model files: method, parameters, inputs, settings.

Every problem is collected into a :class:`Report` at once. The checks that open models
(architectures, shapes, layer ranges, the plan) run in :mod:`merge_engine.session`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from merge_engine.chat_templates import setting_problem
from merge_engine.errors import UnknownMethodError
from merge_engine.io.refs import ModelRef
from merge_engine.methods.registry import METHODS, get_method
from merge_engine.methods.spec import MethodSpec
from merge_engine.recipe import FilterEntry, MergeRecipe


@dataclass
class Report:
    """The outcome of validation: problems make the recipe unusable; warnings do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def _parameter_levels(recipe: MergeRecipe) -> Iterator[tuple[str, bool, Mapping[str, Any]]]:
    """(where, is_model_level, parameters) for every parameters block in the recipe."""
    if recipe.parameters:
        yield "parameters", False, recipe.parameters
    for where, models, slices, params in recipe.input_lists():
        if params:
            yield f"{where}parameters", False, params
        for i, m in enumerate(models or ()):
            if m.parameters:
                yield f"{where}models[{i}] ({m.model})", True, m.parameters
        for i, sl in enumerate(slices or ()):
            if sl.parameters:
                yield f"{where}slices[{i}]", False, sl.parameters
            for j, src in enumerate(sl.sources):
                if src.parameters:
                    yield f"{where}slices[{i}].sources[{j}] ({src.model})", True, src.parameters


def _numbers(setting: Any) -> Iterator[Any]:
    if isinstance(setting, list):
        for v in setting:
            yield from _numbers(v.value if isinstance(v, FilterEntry) else v)
    else:
        yield setting


def check_parameters(recipe: MergeRecipe, spec: MethodSpec, report: Report) -> None:
    """Unknown names (with suggestions), values out of range, misplaced global parameters.

    A parameter another method takes is ignored with a warning, as mergekit ignores it:
    mergekit-evolve writes ``normalize`` and ``int8_mask`` for every method, and ``weight`` on
    slerp sources. A name no method takes is a problem (most often a typo)."""
    known = [p.name for p in spec.params]
    for where, model_level, params in _parameter_levels(recipe):
        for name, setting in params.items():
            p = spec.param(name)
            if p is None and any(other.param(name) is not None for other in METHODS):
                report.warnings.append(f"{where}: '{name}' is not a parameter of {spec.name} and is "
                                       "ignored (as mergekit ignores it); remove it to silence this")
                continue
            if p is None:
                close = difflib.get_close_matches(name, known, n=2)
                hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                    f"{spec.name} takes: {', '.join(known) or 'no parameters'}"
                report.add(f"{where}: unknown parameter '{name}' for {spec.name}; {hint}")
                continue
            if model_level and not p.per_model:
                report.warnings.append(f"{where}: '{name}' is a global parameter of {spec.name} and is "
                                       "ignored here; move it to the top-level parameters")
            for value in _numbers(setting):
                issue = p.check(value)
                if issue:
                    report.add(f"{where}: {issue}")


def _input_groups(recipe: MergeRecipe) -> Iterator[tuple[list[ModelRef], ModelRef | None]]:
    """The models merged together and their base: the ``models`` list, or each slice's sources."""
    for _, models, slices, _ in recipe.input_lists():
        if models is not None:  # an unlisted base is one more input (out_slices.out_slices)
            refs = [m.model for m in models]
            base = recipe.base_model
            yield refs + ([base] if base is not None and base not in refs else []), base
        for sl in slices or ():
            yield [s.model for s in sl.sources], recipe.base_of(sl)


def check_inputs(recipe: MergeRecipe, spec: MethodSpec, report: Report) -> None:
    """A base where the method needs one; as many models per merge as it takes."""
    for refs, base in _input_groups(recipe):
        # a base the method uses is split off the inputs (as out_slices.split_base does)
        n = len([r for r in refs if spec.base == "unused" or base is None or r != base])
        for text in spec.input_problems(n, base is not None,
                                        add_base="add 'base_model: <model>' to the recipe"):
            report.add(text)


def check_unlisted_base(recipe: MergeRecipe, spec: MethodSpec, where: str, base: ModelRef,
                        module_params: Mapping[str, Any] | None, report: Report) -> None:
    """A ``models`` list without its ``base_model``, for a method that takes no base: mergekit
    merges the base in as one more input with the module's or top-level parameters, and so do we
    (said as a warning); a per-model parameter the method requires must then be set there."""
    given = {**(recipe.parameters or {}), **(module_params or {})}
    missing = [p.name for p in spec.params if p.required and p.per_model and p.default is None
               and p.name not in given]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        report.add(f"{where}models does not list base_model {base}, so it is merged in as one more "
                   f"{spec.name} input (as mergekit does) and needs {names}: list it under models with "
                   f"{names}, set {names} in the top-level parameters, or remove base_model")
    else:
        report.warnings.append(f"{where}models does not list base_model {base}: it is merged in as one "
                               f"more {spec.name} input with the top-level parameters, as mergekit does")


def check_tokens(recipe: MergeRecipe, report: Report) -> None:
    """Each ``tokenizer.tokens`` entry takes its rows from a model the recipe merges."""
    inputs = set(recipe.referenced_models())
    for token, setting in ((recipe.tokenizer.tokens or {}) if recipe.tokenizer else {}).items():
        src = setting.source
        donor = src if isinstance(src, ModelRef) else getattr(src, "model", None)
        if donor is not None and donor not in inputs:
            report.add(f"tokenizer.tokens[{token!r}]: model {donor} is not merged by this recipe; "
                       "take the row from one of its models")


def check_recipe(recipe: MergeRecipe, report: Report | None = None) -> Report:
    """Checks that need no model files."""
    report = report or Report()
    try:
        spec = get_method(recipe.merge_method)
    except UnknownMethodError as err:
        report.add(str(err))
        return report
    check_parameters(recipe, spec, report)
    check_inputs(recipe, spec, report)
    for where, models, slices, module_params in recipe.input_lists():
        for i, sl in enumerate(slices or ()):
            refs = [s.model for s in sl.sources]
            if spec.name != "passthrough" and len(set(refs)) != len(refs):
                report.add(f"{where}slices[{i}] lists the same model twice; list each model once per slice")
            base = recipe.base_of(sl)
            if spec.base != "unused" and base is not None and base not in refs:
                report.add(f"{where}slices[{i}] does not list the base model {base} among its "
                           "sources; add it with the same layer_range (mergekit requires it too)")
        refs = [m.model for m in models or ()]
        dup = sorted({str(r) for r in refs if refs.count(r) > 1})
        if dup:
            report.add(f"{where}models lists {', '.join(dup)} more than once; list each model once")
        base = recipe.base_model
        if spec.base == "unused" and models is not None and base is not None and base not in refs:
            check_unlisted_base(recipe, spec, where, base, module_params, report)
    check_tokens(recipe, report)
    if recipe.chat_template is not None:
        problem = setting_problem(recipe.chat_template)
        if problem:
            report.add(problem)
    return report
