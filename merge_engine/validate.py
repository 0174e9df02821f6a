"""Validate a recipe before touching a tensor: schema, method, parameters, models, shapes.

Every problem is collected and reported at once (``evomerge validate``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_engine.errors import MergeError, RecipeError, UnknownMethodError
from merge_engine.io.refs import ModelRef
from merge_engine.methods.registry import get_method
from merge_engine.methods.spec import MethodSpec
from merge_engine.recipe import FilterEntry, MergeRecipe, load_recipe

if TYPE_CHECKING:
    from merge_engine.plan import MergePlan

CHAT_TEMPLATE_NAMES = ("auto", "chatml")


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
    for i, m in enumerate(recipe.models or ()):
        if m.parameters:
            yield f"models[{i}] ({m.model})", True, m.parameters
    for i, sl in enumerate(recipe.slices or ()):
        if sl.parameters:
            yield f"slices[{i}]", False, sl.parameters
        for j, src in enumerate(sl.sources):
            if src.parameters:
                yield f"slices[{i}].sources[{j}] ({src.model})", True, src.parameters


def _numbers(setting: Any) -> Iterator[Any]:
    if isinstance(setting, list):
        for v in setting:
            yield from _numbers(v.value if isinstance(v, FilterEntry) else v)
    else:
        yield setting


def check_parameters(recipe: MergeRecipe, spec: MethodSpec, report: Report) -> None:
    """Unknown names (with suggestions), values out of range, misplaced global parameters."""
    known = [p.name for p in spec.params]
    for where, model_level, params in _parameter_levels(recipe):
        for name, setting in params.items():
            p = spec.param(name)
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


def check_recipe(recipe: MergeRecipe, report: Report | None = None) -> Report:
    """Checks that need no model files."""
    report = report or Report()
    try:
        spec = get_method(recipe.merge_method)
    except UnknownMethodError as err:
        report.add(str(err))
        return report
    check_parameters(recipe, spec, report)
    if spec.base == "required" and recipe.base_model is None:
        report.add(f"{spec.name} needs a base_model; add 'base_model: <model>' to the recipe")
    if spec.name != "passthrough" and recipe.slices is not None:
        for i, sl in enumerate(recipe.slices):
            refs = [s.model for s in sl.sources]
            if len(set(refs)) != len(refs):
                report.add(f"slices[{i}] lists the same model twice; list each model once per slice")
    if spec.base != "unused" and recipe.base_model is not None and recipe.slices is not None:
        for i, sl in enumerate(recipe.slices):
            if all(s.model != recipe.base_model for s in sl.sources):
                report.add(f"slices[{i}] does not list the base model {recipe.base_model} among its "
                           "sources; add it with the same layer_range (mergekit requires it too)")
    if recipe.models is not None:
        refs = [m.model for m in recipe.models]
        dup = sorted({str(r) for r in refs if refs.count(r) > 1})
        if dup:
            report.add(f"models lists {', '.join(dup)} more than once; list each model once")
    tok = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    if tok == "union":
        report.add("tokenizer_source: union is not supported yet; use 'base' or a model reference")
    if recipe.tokenizer is not None and recipe.tokenizer.tokens:
        report.add("tokenizer.tokens is not supported yet; remove it or use tokenizer_source")
    ct = recipe.chat_template
    if ct is not None and ct not in CHAT_TEMPLATE_NAMES and "{" not in ct:
        report.add(f"chat_template {ct!r} is not a known template ({', '.join(CHAT_TEMPLATE_NAMES)}) "
                   "nor a Jinja string; use one of those")
    return report


def open_readers(recipe: MergeRecipe, stack: ExitStack, report: Report, *, allow_pickle: bool = False,
                 trust_remote_code: bool = False,
                 opened: Mapping[ModelRef, Any] | None = None) -> dict[ModelRef, Any]:
    """Resolve and open every referenced model (reusing readers in ``opened``); problems go to
    ``report``."""
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.resolve import resolve_model_dir

    readers: dict[ModelRef, Any] = {}
    for ref in recipe.referenced_models():
        if opened is not None and ref in opened:
            readers[ref] = opened[ref]
            continue
        try:
            path = resolve_model_dir(ref, allow_pickle=allow_pickle)
            readers[ref] = stack.enter_context(CheckpointReader(
                path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
        except MergeError as err:
            report.add(str(err))
    tok = recipe.tokenizer_model()
    if isinstance(tok, ModelRef) and tok not in readers:
        try:
            resolve_model_dir(tok)
        except MergeError as err:
            report.add(f"tokenizer source: {err}")
    return readers


def check_models(recipe: MergeRecipe, readers: Mapping[ModelRef, Any], report: Report) -> MergePlan | None:
    """Architectures, layer ranges and shapes across models (reads headers and configs only).

    Returns the plan that the check builds, or None when a problem was found."""
    from merge_engine.layout import check_compatible
    from merge_engine.plan import build_plan

    for text in check_compatible({str(ref): (r.tensor_names, r.config, {n: tuple(r.shape(n))
                                  for n in r.tensor_names}) for ref, r in readers.items()}):
        report.add(text)
    if report.problems:
        return None
    try:
        plan = build_plan(recipe, readers)
    except RecipeError as err:
        for text in err.problems:
            report.add(text)
        return None
    report.warnings.extend(plan.warnings)
    return plan


def validate_recipe(recipe: MergeRecipe | str | Path, *, with_models: bool = True,
                    allow_pickle: bool = False, trust_remote_code: bool = False) -> Report:
    """Everything that can be checked before a merge runs, all problems at once."""
    report = Report()
    if not isinstance(recipe, MergeRecipe):
        try:
            recipe = load_recipe(recipe)
        except RecipeError as err:
            report.problems.extend(err.problems)
            return report
    check_recipe(recipe, report)
    if not with_models or report.problems:
        return report
    with ExitStack() as stack:
        readers = open_readers(recipe, stack, report, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code)
        if not report.problems:
            check_models(recipe, readers, report)
    return report
