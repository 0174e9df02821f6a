"""Check a multi-stage recipe without merging: every stage planned against the plans of the
stages it reads (:func:`validate_stages`), and the model comparison of stage outputs
(:func:`compare_held`) that :class:`~merge_engine.multistage.StagePipeline` runs before a stage."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from merge_engine.errors import MergeError, RecipeError
from merge_engine.io.memory import MemoryModel
from merge_engine.io.refs import ModelRef
from merge_engine.merge import planned_model
from merge_engine.recipe import MergeRecipe
from merge_engine.stages import Stage, bind, stage_refs
from merge_engine.validate import Report


def compare_held(recipe: MergeRecipe, opened: Mapping[ModelRef, Any]) -> list[str]:
    """The model comparison prepare skips when every model of ``recipe`` is in ``opened`` (it
    takes those for compared already; stage outputs never were): problems, one line each."""
    from merge_engine.layout import check_compatible

    refs = recipe.referenced_models()
    if refs and all(ref in opened for ref in refs):
        return check_compatible({str(ref): opened[ref] for ref in refs})
    return []


def validate_stages(stages: Sequence[Stage], *, with_models: bool = True,
                    model_configs: Mapping[str, str | Path] | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False, planned: dict[str, MemoryModel] | None = None,
                    lora_merge_dtype: str | None = None) -> Report:
    """Every problem of every stage, found without merging: each stage is checked as
    :func:`merge_engine.session.prepare` checks a recipe, the stages it reads standing in as
    their plans (names, shapes, dtypes, config, tokenizer files). A stage reading a stage with
    problems is not checked. Problems and warnings are prefixed with the stage's label.
    ``planned``, when given, receives each named stage's planned output (names, shapes, config;
    no tensors; its folder is removed on return). ``lora_merge_dtype`` as
    :func:`~merge_engine.multistage.run_stages` takes it (adapters on stages are checked too)."""
    from merge_engine.session import prepare
    from merge_engine.validate import check_recipe

    report = Report()
    if not with_models:
        for stage in stages:
            sub = check_recipe(stage.recipe)
            report.problems.extend(f"{stage.label}: {p}" for p in sub.problems)
            report.warnings.extend(f"{stage.label}: {w}" for w in sub.warnings)
        return report
    planned = {} if planned is None else planned
    with tempfile.TemporaryDirectory(prefix="evomerge-validate-") as work:
        for stage in stages:
            if any(need not in planned for need in stage.needs):
                continue  # a stage it reads has problems, already reported
            recipe = bind(stage.recipe, {n: planned[n].model_dir for n in stage.needs})
            try:
                opened = {ref: _planned_reader(ref, planned[n], allow_pickle, lora_merge_dtype) for n in stage.needs
                          for ref in stage_refs(recipe) if ref.path == str(planned[n].model_dir)}
            except MergeError as err:  # an adapter on a stage that does not fit it
                report.problems.append(f"{stage.label}: {err}")
                continue
            problems = compare_held(recipe, opened)
            if problems:
                report.problems.extend(f"{stage.label}: {p}" for p in problems)
                continue
            with ExitStack() as stack:
                try:
                    plan, readers = prepare(recipe, stack, opened=opened, model_configs=model_configs,
                                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                            lora_merge_dtype=lora_merge_dtype)
                except RecipeError as err:
                    report.problems.extend(f"{stage.label}: {p}" for p in err.problems)
                    continue
                report.warnings.extend(f"{stage.label}: {w}" for w in plan.warnings)
                if stage.name is not None:
                    folder = Path(work) / stage.name
                    folder.mkdir()
                    planned[stage.name] = planned_model(plan, readers, recipe, stage.name, folder)
    return report


def _planned_reader(ref: ModelRef, model: MemoryModel, allow_pickle: bool, lora_merge_dtype: str | None) -> Any:
    """A planned stage output as the stage reading ``ref`` sees it: with ``ref``'s adapter applied
    (checked against the planned shapes; nothing is read) when it names one."""
    if not ref.lora:
        return model
    from merge_engine.dtypes import torch_dtype
    from merge_engine.io.lora import LoraReader
    from merge_engine.io.resolve import resolve_adapter_dir

    adapter = resolve_adapter_dir(ref, allow_pickle=allow_pickle)
    return LoraReader(model, adapter, name=f"{model.name}+{ref.lora}", allow_pickle=allow_pickle,
                      merge_dtype=torch_dtype(lora_merge_dtype) if lora_merge_dtype else None)
