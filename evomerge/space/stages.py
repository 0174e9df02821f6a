"""Multi-stage candidates: a searched recipe among fixed stages, and per-layer-group methods.

A search space may name a multi-stage recipe file (mergekit-multi's format) whose stages stay
fixed while one stage is searched:

    stages: fixed.yaml                          # the searched recipe is the final stage; it may
                                                # read the file's named stages as models
    stages: {file: pipeline.yaml, replace: s1}  # the searched recipe replaces stage s1; later
                                                # fixed stages (the final one too) read it

With ``layer_methods: true`` (several methods and ``layer_granularity``) each layer group picks
its own method (genes ``layers_00_07.method``): the candidate is one stage per chosen method
(``method-<name>``, that method's full merge with its searched parameters) and a final
``passthrough`` stage whose slices take each group's layers from its method's stage. A candidate
whose groups all pick one method is that method's plain one-stage recipe.

A candidate is a list of :class:`~merge_engine.stages.Stage` in run order, final last (one stage
for a plain recipe); :class:`~evomerge.candidate.Candidate` applies it in memory and
``stages_yaml`` of it is the recipe file ``evomerge merge`` re-merges to the same model.

Lifecycle: :class:`StagesRef` is part of a validated space; :func:`fixed_stages` reads the file
once per process (cached by path); :func:`candidate_stages` once per candidate.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import model_validator

from evomerge.errors import ProblemsError
from merge_engine.errors import RecipeError
from merge_engine.recipe import Frozen, MergeRecipe, parse_recipe
from merge_engine.stages import Stage, load_stages, needed_stages, order_stages, with_overrides

if TYPE_CHECKING:
    from evomerge.space.schema import SearchSpace

METHOD_STAGE = "method-{}"  # the stage name of one method's merge in a per-layer-group candidate


class StagesError(ProblemsError):
    """The fixed stages of a space cannot hold the searched stage."""


class StagesRef(Frozen):
    """The ``stages:`` block of a search space: a multi-stage recipe ``file`` (relative to the
    space file) and the stage the searched recipe ``replace``-s (None: it is the final stage)."""

    file: str
    replace: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value


@functools.lru_cache(maxsize=16)
def _load(file: str) -> tuple[Stage, ...]:
    return tuple(load_stages(file))


def fixed_stages(space: SearchSpace) -> list[Stage]:
    """The stages of the space's ``stages`` file in run order (none without one)."""
    if space.stages is None:
        return []
    try:
        return list(_load(space.stages.file))
    except RecipeError as err:
        raise StagesError(err.problems, f"stages file {space.stages.file}") from None


def stage_names(space: SearchSpace) -> set[str]:
    """Names a space's models may use to read a fixed stage's output."""
    return {s.name for s in fixed_stages(space) if s.name is not None}


def stage_read(model: str, names: set[str]) -> str | None:
    """The stage of ``names`` that model reference ``model`` reads (``NAME`` or ``NAME+adapter``:
    the stage's output, with the adapter applied), else None."""
    path = model.split("+", 1)[0]
    return path if path in names else None


def stages_problems(space: SearchSpace) -> list[str]:
    """What the ``stages``/``layer_methods`` settings of a space get wrong (one line each)."""
    problems = []
    if space.layer_methods:
        if len(space.methods) < 2:
            problems.append("layer_methods needs several methods to choose from; list them in 'method'")
        if len(space.layer_groups()) < 2 or space.smooth:
            problems.append("layer_methods chooses a method per layer group: set layer_granularity "
                            "below num_layers (and not smooth)")
        if space.stages is not None or space.layer_path is not None:
            problems.append("layer_methods cannot be combined with stages or layer_path; remove one")
    if space.stages is None:
        return problems
    if not Path(space.stages.file).is_file():
        return problems + [f"stages file {space.stages.file} does not exist; give a multi-stage "
                           "recipe YAML path (relative to the space file)"]
    try:
        stages = fixed_stages(space)
    except StagesError as err:
        return problems + list(err.problems)
    names = [s.name for s in stages]
    replace = space.stages.replace
    if replace is None and None in names:
        problems.append(f"stages file {space.stages.file} has an unnamed final stage; name it, or "
                        "say which stage the search replaces (stages: {file: ..., replace: NAME})")
    if replace is not None and replace not in names:
        problems.append(f"stages.replace {replace!r} is no stage of {space.stages.file}; stages are "
                        f"{', '.join(str(n) for n in names)}")
    if replace is not None and any(stage_read(m.model, {replace}) for m in space.all_models()):
        problems.append(f"the searched stage {replace!r} cannot read itself; its models must be "
                        "other stages or model folders")
    return problems


def candidate_stages(space: SearchSpace, recipe: MergeRecipe) -> list[Stage]:
    """The stages of one candidate: the searched ``recipe`` placed among the space's fixed
    stages, checked and in run order (RecipeError lists problems)."""
    fixed = fixed_stages(space)
    if not fixed:
        return [Stage(None, recipe, ())]
    if space.stages.replace is not None:
        return read_by_final(with_overrides(fixed, {space.stages.replace: recipe}))
    return read_by_final(order_stages([s.recipe for s in fixed] + [recipe.model_copy(update={"name": None})],
                                      f"search space {space.name}"))


def read_by_final(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` (run order) without the stages the final one does not read, directly or
    through others (a layer path may skip a stage's layers): a recipe file holds no stage that
    nothing reads (``evomerge merge`` refuses one)."""
    needed = needed_stages(stages, stages[-1].needs)
    return [s for s in stages[:-1] if s.name in needed] + [stages[-1]]


# ---------------------------------------------------------------- per-layer-group methods
def group_method_genes(labels: Sequence[str]) -> list[str]:
    """The method gene of each layer group: ``layers_00_07.method``."""
    return [f"{label}.method" for label in labels]


def layer_method_stages(space: SearchSpace, choice: Sequence[str],
                        recipes: Mapping[str, MergeRecipe]) -> list[Stage]:
    """The candidate in which layer group ``i`` takes its layers from ``recipes[choice[i]]``:
    one stage per chosen method then a passthrough slices stage (one stage when all agree)."""
    used = list(dict.fromkeys(choice))
    if len(used) == 1:
        return [Stage(None, recipes[used[0]], ())]
    slices: list[dict[str, Any]] = []
    prev = None
    for (a, b), method in zip(space.layer_groups(), choice):
        if method == prev:
            slices[-1]["sources"][0]["layer_range"][1] = b + 1
        else:
            slices.append({"sources": [{"model": METHOD_STAGE.format(method), "layer_range": [a, b + 1]}]})
        prev = method
    final = parse_recipe({"merge_method": "passthrough", "slices": slices, "dtype": space.dtype},
                         source=f"search space {space.name}")
    named = [recipes[m].model_copy(update={"name": METHOD_STAGE.format(m)}) for m in used]
    return order_stages([*named, final], f"search space {space.name}")


def stage_names_in(block: Any) -> set[str]:
    """Stage names of a raw ``stages:`` value (a path or ``{file: ...}``, already absolute) while
    a space file is read, before it is validated; empty when the file cannot be read (the
    validated space reports that)."""
    file = block.get("file") if isinstance(block, Mapping) else block
    try:
        return {s.name for s in _load(str(file)) if s.name is not None} if isinstance(file, str) else set()
    except (RecipeError, OSError):
        return set()


def validate_candidate(space: SearchSpace, recipe: MergeRecipe) -> Any:
    """Every problem of the candidate ``recipe`` makes among the space's fixed stages, found
    without merging (a :class:`~merge_engine.validate.Report`)."""
    from merge_engine.stage_validate import validate_stages
    from merge_engine.session import validate

    stages = candidate_stages(space, recipe)
    return validate(stages[0].recipe) if len(stages) == 1 else validate_stages(stages)


def resident_model(space: SearchSpace) -> str:
    """The model a search loads as its resident model: the base (else first) model of the space
    that is a model, not a fixed stage, else the first model the fixed stages read."""
    from merge_engine.stages import stage_refs

    fixed = stage_names(space)
    paths = [m.model for m in space.all_models()]
    paths += [str(r) for s in fixed_stages(space) for r in stage_refs(s.recipe)]
    return next(p for p in paths if not stage_read(p, fixed))


def stage_shapes(space: SearchSpace) -> dict[str, Any]:
    """The :class:`~evomerge.space.layer_path.ModelShape` of each fixed stage's output, from
    its plan (no tensor is merged); a stage that cannot be planned is one StagesError line."""
    return dict(_stage_shapes(space.stages.file))


@functools.lru_cache(maxsize=16)
def _stage_shapes(file: str) -> tuple[tuple[str, Any], ...]:
    from evomerge.space.layer_path import shape_of
    from merge_engine.stage_validate import validate_stages

    planned: dict[str, Any] = {}
    report = validate_stages(list(_load(file)), planned=planned)
    if report.problems:
        raise StagesError(report.problems[:5], f"stages file {file}")
    return tuple((name, shape_of(name, model)) for name, model in planned.items())


def input_stages(space: SearchSpace, model: str) -> list[Stage] | None:
    """The fixed stages that build input ``model`` when it reads one (that stage last; for
    ``NAME+adapter`` then a final stage reading it with the adapter), to score it beside the
    other input models; None for a model folder."""
    fixed = fixed_stages(space)
    name = stage_read(model, {s.name for s in fixed if s.name is not None})
    if name is None:
        return None
    needed = needed_stages(fixed, [name])
    stages = [s for s in fixed if s.name in needed]  # run order: ``name`` last
    if name == model:
        return stages
    one = parse_recipe({"merge_method": "linear", "dtype": space.dtype,
                        "models": [{"model": model, "parameters": {"weight": 1.0}}]})
    return stages + [Stage(None, one, (name,))]
