"""The cross-field rules of a search space: every rule adds one line (the rule and the offending
value) to the list of problems, so a space reports all its problems at once. Called by
:class:`~evomerge.space.schema.SearchSpace`'s validator."""

from __future__ import annotations

from pathlib import Path

from evomerge.space.layer_path import layer_path_problems
from evomerge.space.objectives import objective_problems
from evomerge.space.rungs import fidelity_problems
from evomerge.space.schema import (GENE_RULES, SearchSpace, method_spec, registry_range, signed,
                                   switches)
from evomerge.space.stages import stages_problems
from merge_engine.errors import MergeError
from merge_engine.methods.spec import MethodSpec


def space_problems(space: SearchSpace) -> list[str]:
    problems: list[str] = []
    specs: list[MethodSpec] = []
    for name in space.methods:
        try:
            specs.append(method_spec(name))
        except MergeError as err:
            problems.append(str(err))
    if space.layer_path is not None:  # the path is searched, not the method's parameters
        specs, problems = [], problems + layer_path_problems(space)
    problems += stages_problems(space)
    if len(set(space.methods)) != len(space.methods):
        problems.append(f"method lists {list(space.methods)} with repeats; list each once")
    for label, items in (("name", [m.name for m in space.all_models()]),
                         ("path", [m.model for m in space.all_models()])):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            problems.append(f"model {label}s {dup} appear more than once; give each model once")
    for spec in specs:
        n_inputs = len(space.models) + (1 if space.base_model and spec.base == "unused" else 0)
        problems += [f"method {text}" for text in spec.input_problems(
            n_inputs, space.base_model is not None, add_base="add 'base_model: PATH'",
            fix_count="change the models or the method")]
    if specs:
        problems += _search_problems(space, specs)
        problems += _parameter_problems(space, specs)
    for sp in space.start:
        if sp.recipe is not None and not Path(sp.recipe).is_file():
            problems.append(f"start recipe {sp.recipe} does not exist; give a recipe YAML path "
                            "(relative to the space file)")
    if space.layer_granularity is not None and space.layer_granularity > space.num_layers:
        problems.append(f"layer_granularity {space.layer_granularity} exceeds the model's "
                        f"{space.num_layers} layers; use 1..{space.num_layers} or omit it")
    if space.smooth and len(space.layer_groups()) < 2:
        problems.append("smooth needs at least 2 control points; set layer_granularity below num_layers")
    problems += objective_problems(space)
    if space.pruning is not None and isinstance(space.eval.limit, int) and space.pruning.limit >= space.eval.limit:
        problems.append(f"pruning.limit {space.pruning.limit} must be below eval.limit {space.eval.limit}")
    return problems + fidelity_problems(space)


def _parameter_problems(space: SearchSpace, specs: list[MethodSpec]) -> list[str]:
    problems = []
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
    for param in switches(space):
        if not any(s.param(param) for s in specs):
            problems.append(f"{GENE_RULES[param].switch} is set but {list(space.methods)} take no "
                            f"{param} parameter; remove it")
    return problems


def _search_problems(space: SearchSpace, specs: list[MethodSpec]) -> list[str]:
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
        if low < 0 and not signed(space, name):
            problems.append(f"search: {name} range [{low}, {high}] goes below 0; set "
                            f"{GENE_RULES[name].signed_by}: true or start the range at 0")
        for q in params:
            if q.low is not None and low < q.low or q.high is not None and high > q.high:
                problems.append(f"search: {name} range [{low}, {high}] leaves the valid range "
                                f"[{q.low}, {q.high}] of the method's {name}")
                break
    searched_switch = "search" in switches(space).values()
    if space.search is not None and not searched_switch and not any(
            p.name in space.search for s in specs for p in s.params):
        problems.append("search lists no parameter of the method(s); nothing would be searched")
    return problems
