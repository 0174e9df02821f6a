"""Cross-field rules of a search space, checked against the method registry.

Called by :class:`evomerge.space.SearchSpace`'s validator; every rule adds one line to the list
of problems (the rule and the offending value), so a space reports all its problems at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merge_engine.methods.spec import MethodSpec

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

SCORE = "score"  # the objective name of the weighted eval score


def method_spec(method: str) -> MethodSpec:
    from merge_engine.methods.registry import get_method

    return get_method(method)


def registry_range(methods: Sequence[str], name: str) -> tuple[float, float]:
    ranges = [p.search for m in methods if (p := method_spec(m).param(name)) is not None and p.search]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def space_problems(space: SearchSpace) -> list[str]:
    from merge_engine.errors import MergeError

    problems: list[str] = []
    specs: list[MethodSpec] = []
    for name in space.methods:
        try:
            specs.append(method_spec(name))
        except MergeError as err:
            problems.append(str(err))
    if len(set(space.methods)) != len(space.methods):
        problems.append(f"method lists {list(space.methods)} with repeats; list each once")
    names = [m.name for m in space.models] + ([space.base_model.name] if space.base_model else [])
    paths = [m.model for m in space.models] + ([space.base_model.model] if space.base_model else [])
    for label, items in (("name", names), ("path", paths)):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            problems.append(f"model {label}s {dup} appear more than once; give each model once")
    for spec in specs:
        n_inputs = len(space.models) + (1 if space.base_model and spec.base == "unused" else 0)
        if spec.base == "required" and space.base_model is None:
            problems.append(f"method {spec.name} needs a base_model; add 'base_model: PATH'")
        if n_inputs < spec.min_models or (spec.max_models is not None and n_inputs > spec.max_models):
            if spec.max_models == spec.min_models:
                want = f"exactly {spec.min_models}"
            elif spec.max_models is None:
                want = f"at least {spec.min_models}"
            else:
                want = f"{spec.min_models} to {spec.max_models}"
            problems.append(f"method {spec.name} merges {want} model(s) besides a base, got {n_inputs}")
    if specs:
        problems += search_problems(space, specs)
        known = sorted({p.name for s in specs for p in s.params})
        for k, v in space.parameters.items():
            if k not in known:
                problems.append(f"parameters: {k!r} is not a parameter of {[s.name for s in specs]}; "
                                f"known: {known}")
            elif space.search and k in space.search:
                problems.append(f"{k!r} is both fixed (parameters) and searched (search); keep one")
            else:
                problems += [f"parameters: {issue}" for s in specs if (p := s.param(k)) is not None
                             and not isinstance(v, list) and (issue := p.check(v)) is not None]
        if space.normalize is not None and not any(s.param("normalize") for s in specs):
            problems.append(f"normalize is set but {list(space.methods)} take no normalize parameter; "
                            "remove it")
    for sp in space.start:
        if sp.recipe is not None and not Path(sp.recipe).is_file():
            problems.append(f"start recipe {sp.recipe} does not exist; give a recipe YAML path "
                            "(relative to the space file)")
    if space.layer_granularity is not None and space.layer_granularity > space.num_layers:
        problems.append(f"layer_granularity {space.layer_granularity} exceeds the model's "
                        f"{space.num_layers} layers; use 1..{space.num_layers} or omit it")
    if space.smooth and len(space.layer_groups()) < 2:
        problems.append("smooth needs at least 2 control points; set layer_granularity below num_layers")
    tasks = {t.name for t in space.eval.tasks}
    for o in space.objectives:
        if o != SCORE and o not in tasks:
            problems.append(f"objective {o!r} is neither 'score' nor a task in eval.tasks {sorted(tasks)}")
    if len(set(space.objectives)) != len(space.objectives):
        problems.append(f"objectives {list(space.objectives)} repeat a name")
    multi = len(space.objectives) > 1
    if multi and space.sampler in ("cmaes", "gp"):
        problems.append(f"sampler {space.sampler} optimizes one objective; with "
                        f"{len(space.objectives)} objectives use nsga2, tpe or random")
    if not multi and space.sampler == "nsga2":
        problems.append("sampler nsga2 is for several objectives; use cmaes, tpe, gp or random")
    if multi and space.pruning is not None:
        problems.append("pruning (cheap-first evaluation) works with one objective only; remove it")
    if space.pruning is not None and isinstance(space.eval.limit, int) and space.pruning.limit >= space.eval.limit:
        problems.append(f"pruning.limit {space.pruning.limit} must be below eval.limit {space.eval.limit}")
    return problems


def search_problems(space: SearchSpace, specs: list[MethodSpec]) -> list[str]:
    problems = []
    for name, sp in (space.search or {}).items():
        params = [p for s in specs if (p := s.param(name)) is not None]
        if not params:
            known = sorted({p.name for s in specs for p in s.params})
            problems.append(f"search: {name!r} is not a parameter of {[s.name for s in specs]}; "
                            f"known: {known}")
            continue
        p = params[0]
        if p.kind == "bool" or sp.choices is not None:
            continue
        if sp.low is None and not any(q.search for q in params):
            problems.append(f"search: {name!r} has no default search range; give [low, high]")
            continue
        low, high = (sp.low, sp.high) if sp.low is not None else registry_range(space.methods, name)
        if name == "weight" and low < 0 and not space.allow_negative_weights:
            problems.append(f"search: weight range [{low}, {high}] goes below 0; set "
                            "allow_negative_weights: true or start the range at 0")
        for q in params:
            if q.low is not None and low < q.low or q.high is not None and high > q.high:
                problems.append(f"search: {name} range [{low}, {high}] leaves the valid range "
                                f"[{q.low}, {q.high}] of the method's {name}")
                break
    if space.search is not None and not any(
            p.name in space.search for s in specs for p in s.params) and space.normalize != "search":
        problems.append("search lists no parameter of the method(s); nothing would be searched")
    return problems
