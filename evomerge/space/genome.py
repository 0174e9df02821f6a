"""The searched numbers of a space: readable parameter slots, trial → recipe, and back.

    dists = distributions(space)                   # every parameter a study may suggest, by name
    recipe = trial_recipe(space, trial)            # any optuna trial, including FixedTrial
    stages = trial_stages(space, trial)            # the candidate as stages, final last
    proposal = trial_candidate(space, trial)       # the candidate a search applies (evomerge.proposal)
    points = start_points(space)                   # (label, params) to enqueue in a new study

Parameter names are readable and stable: ``<layers>.<filter>.<model>.<param>``, each part present
only when it varies, e.g. ``layers_00_07.mlp.math.weight``, ``math.density`` or ``lambda``. With
``smooth: true`` the layer part names a gradient control point (``layer_07``) instead of a group.
Which parameters a method has, their valid ranges and default search ranges come from the method
registry (``merge_engine.methods.registry``); parameters with space-level rules (``weight``,
``normalize``) are described once, in :data:`evomerge.space.schema.GENE_RULES`.

Lifecycle: pure functions of a validated space; :func:`trial_recipe` once per candidate (it builds
the one :class:`~merge_engine.recipe.MergeRecipe` of the trial), :func:`start_points` once when a
study is created (it reads the base model's tensor names to place recipe values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

import evomerge.space.layer_path as layer_path
from evomerge.proposal import MultiStageRecipe
from evomerge.space.stages import candidate_stages, group_method_genes, layer_method_stages
from evomerge.space.schema import (GENE_RULES, REST, SWITCH_CHOICES, SearchSpace, SpaceError,
                                   method_spec, registry_range, signed, switches)
from merge_engine.layout import LayerLayout, detect_layout
from merge_engine.methods.spec import MethodSpec, Param
from merge_engine.recipe import MergeRecipe, parse_recipe
from merge_engine.settings import evaluate_setting, layer_position, resolve
from merge_engine.stages import Stage


@dataclass(frozen=True)
class Slot:
    """One searched number: its readable name, distribution and where it lands in the recipe."""

    name: str
    param: str
    model: str | None           # None: a global parameter
    group: int | None           # layer group / control point index; None: not layered
    filter: str | None          # None: no filters, or the remainder entry when filters are used
    distribution: BaseDistribution


# ---------------------------------------------------------------- names and distributions
def group_labels(space: SearchSpace) -> list[str]:
    """Readable layer part of parameter names: groups (steps) or control points (smooth)."""
    width = max(2, len(str(space.num_layers - 1)))
    if space.smooth:
        return [f"layer_{pos:0{width}d}" for pos in knot_layers(space)]
    return [f"layers_{a:0{width}d}_{b:0{width}d}" for a, b in space.layer_groups()]


def knot_layers(space: SearchSpace) -> list[int]:
    """The layer of each control point (smooth) spread evenly over the stack."""
    n, last = len(space.layer_groups()), space.num_layers - 1
    return [0] if n == 1 else [round(k * last / (n - 1)) for k in range(n)]


def slots(space: SearchSpace, method: str) -> list[Slot]:
    """Every searched number of ``method``, in a stable order (switch genes excluded)."""
    spec = method_spec(method)
    labels = group_labels(space)
    filters: list[str | None] = [*space.filters, None] if space.filters else [None]
    out: list[Slot] = []
    for param in _searched_params(space, spec):
        dist = _distribution(space, param)
        layered = _layered(space, param) and not isinstance(dist, CategoricalDistribution)
        owners: list[str | None] = [m.name for m in space.inputs(method)] if param.per_model else [None]
        for owner in owners:
            for gi, label in enumerate(labels) if layered else [(None, None)]:
                for f in filters if layered else [None]:
                    parts = [label if layered and len(labels) > 1 else None,
                             (f or REST) if layered and space.filters else None, owner, param.name]
                    name = ".".join(p for p in parts if p is not None)
                    out.append(Slot(name, param.name, owner, gi, f, dist))
    return out


def searched_switches(space: SearchSpace, method: str) -> list[str]:
    """Switch genes (``normalize: search``) that ``method`` takes: one categorical each."""
    spec = method_spec(method)
    return [p for p, v in switches(space).items() if v == "search" and spec.param(p) is not None]


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every parameter the search may suggest (union over methods), by name."""
    if space.layer_path is not None:
        return layer_path.distributions(space)
    dists: dict[str, BaseDistribution] = {}
    if space.layer_methods:
        dists.update({g: CategoricalDistribution(space.methods) for g in group_method_genes(group_labels(space))})
    elif len(space.methods) > 1:
        dists["method"] = CategoricalDistribution(space.methods)
    for method in space.methods:
        dists.update({s.name: s.distribution for s in slots(space, method)})
    dists.update({p: CategoricalDistribution(SWITCH_CHOICES) for p, v in switches(space).items() if v == "search"})
    return dists


def _searched_params(space: SearchSpace, spec: MethodSpec) -> list[Param]:
    if space.search is None:
        return [p for p in spec.params if p.search is not None and p.kind != "bool"
                and p.name not in space.parameters and not _has_switch(p.name)]
    return [p for p in spec.params if p.name in space.search]


def _has_switch(param: str) -> bool:
    rule = GENE_RULES.get(param)
    return rule is not None and rule.switch is not None


def _layered(space: SearchSpace, param: Param) -> bool:
    sp = (space.search or {}).get(param.name)
    return sp.layered if sp is not None and sp.layered is not None else param.per_model


def _distribution(space: SearchSpace, param: Param) -> BaseDistribution:
    """The same distribution for a name in every method (union of the registry ranges)."""
    sp = (space.search or {}).get(param.name)
    if (sp is not None and sp.choices is not None) or param.kind == "bool":
        return CategoricalDistribution((sp.choices if sp is not None else None) or (False, True))
    explicit = sp is not None and sp.low is not None
    low, high = (sp.low, sp.high) if explicit else registry_range(space.methods, param.name)
    rule = GENE_RULES.get(param.name)
    if not explicit and rule is not None and rule.signed_by and signed(space, param.name) and low >= 0:
        low = -high
    log = sp.log if sp is not None else False
    if param.kind == "int":
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


# ---------------------------------------------------------------- trial → recipe
def trial_recipe(space: SearchSpace, trial: Any) -> MergeRecipe:
    """The recipe ``trial`` proposes (suggests every parameter of the chosen method).

    A layer-path space suggests its path genes instead, rejects a bad path (empty, over
    ``max_layers``) with one line before any tensor is read, and records the candidate's
    ``layers``/``params`` user attributes (:func:`evomerge.space.layer_path.trial_recipe`)."""
    if space.layer_path is not None:
        return layer_path.trial_recipe(space, trial)
    if space.layer_methods:
        raise SpaceError("a layer_methods space proposes multi-stage candidates; use trial_stages",
                         f"search space {space.name}")
    method = trial.suggest_categorical("method", space.methods) if len(space.methods) > 1 \
        else space.methods[0]
    return _method_recipe(space, trial, method)


def trial_stages(space: SearchSpace, trial: Any) -> list[Stage]:
    """The candidate ``trial`` proposes as stages in run order, final last: one stage for a plain
    space; the searched recipe among the fixed ``stages``; or, with ``layer_methods``, one stage
    per method the layer groups pick and a passthrough stage joining their layers
    (:mod:`evomerge.space.stages`). Raises RecipeError/SpaceError before any tensor is read."""
    if space.layer_methods:
        choice = [trial.suggest_categorical(g, space.methods) for g in group_method_genes(group_labels(space))]
        return layer_method_stages(space, choice, {m: _method_recipe(space, trial, m) for m in dict.fromkeys(choice)})
    return candidate_stages(space, trial_recipe(space, trial))


def trial_candidate(space: SearchSpace, trial: Any) -> MergeRecipe | MultiStageRecipe:
    """The candidate ``trial`` proposes, as the search loop applies and stores it: the recipe
    when :func:`trial_stages` is one stage, else the stages as a :class:`MultiStageRecipe`."""
    stages = trial_stages(space, trial)
    return stages[0].recipe if len(stages) == 1 else MultiStageRecipe(stages)


def _method_recipe(space: SearchSpace, trial: Any, method: str) -> MergeRecipe:
    values = {s.name: _suggest(trial, s) for s in slots(space, method)}
    for param in searched_switches(space, method):
        values[param] = trial.suggest_categorical(param, SWITCH_CHOICES)
    return build_recipe(space, method, values)


def build_recipe(space: SearchSpace, method: str, values: Mapping[str, Any]) -> MergeRecipe:
    """The recipe for ``method`` with searched ``values`` by parameter name (pure)."""
    if space.layer_path is not None:
        return layer_path.build_recipe(space, values)
    spec = method_spec(method)
    per_model: dict[str, dict[str, Any]] = {m.name: {} for m in space.inputs(method)}
    top: dict[str, Any] = {k: v for k, v in space.parameters.items() if spec.param(k) is not None}
    for param, setting in switches(space).items():
        if isinstance(setting, bool) and spec.param(param) is not None:
            top[param] = setting
        if param in values:
            top[param] = values[param]
    by_target: dict[tuple[str, str | None], list[Slot]] = {}
    for slot in slots(space, method):
        by_target.setdefault((slot.param, slot.model), []).append(slot)
    for (param, owner), group in by_target.items():
        (per_model[owner] if owner is not None else top)[param] = _setting(space, group, values)
    data: dict[str, Any] = {"merge_method": method, "dtype": space.dtype, "seed": space.seed}
    if spec.base != "unused" and space.base_model is not None:
        data["base_model"] = space.base_model.model
    data["models"] = [{"model": m.model, **({"parameters": per_model[m.name]} if per_model[m.name] else {})}
                      for m in space.inputs(method)]
    if top:
        data["parameters"] = top
    return parse_recipe(data, source=f"search space {space.name}")


def _setting(space: SearchSpace, group: list[Slot], values: Mapping[str, Any]) -> Any:
    """Scalar, per-layer list (steps), control points (smooth) or filter entries."""
    if group[0].group is None:
        return _plain(values[group[0].name])
    entries = []
    for f in [*space.filters, None] if space.filters else [None]:
        points = [_plain(values[s.name]) for s in group if s.filter == f]
        if len(set(map(repr, points))) == 1:  # one value everywhere reads best as a number
            value: Any = points[0]
        elif space.smooth:
            value = points
        else:  # steps: one value per layer, v[i] at layer i
            value = [points[gi] for gi, (a, b) in enumerate(space.layer_groups()) for _ in range(a, b + 1)]
        entries.append({"filter": f, "value": value} if f is not None else {"value": value})
    return entries if space.filters else entries[0]["value"]


# ---------------------------------------------------------------- start points (recipe → trial)
def start_points(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) for each start point, ready for ``study.enqueue_trial``.

    Recipe paths were made absolute (relative to the space file) when the space was loaded.
    """
    from merge_engine.recipe import load_recipe

    out = []
    for sp in space.start:
        if sp.equal:
            out.append(("equal", equal_params(space)))
        elif sp.params is not None:
            out.append(("params", dict(sp.params)))
        else:
            out.append((f"recipe:{sp.recipe}", params_from_recipe(space, load_recipe(sp.recipe))))
    return out


def equal_params(space: SearchSpace, method: str | None = None) -> dict[str, Any]:
    """Every model weighted the same (1/N, or the range's middle); other params at defaults.
    A layer-path space: the path through the first model's own layers (that model, unchanged)."""
    if space.layer_path is not None:
        return layer_path.identity_params(space)
    method = method or space.methods[0]
    spec = method_spec(method)
    n = len(space.inputs(method))
    params = _method_genes(space, method)
    for slot in slots(space, method):
        rule = GENE_RULES.get(slot.param)
        preferred = 1.0 / n if rule is not None and rule.equal_share else spec.param(slot.param).default
        params[slot.name] = _within(slot.distribution, preferred)
    for param in searched_switches(space, method):
        params[param] = bool(spec.param(param).default)
    return params


def params_from_recipe(space: SearchSpace, recipe: MergeRecipe) -> dict[str, Any]:
    """The searched values that reproduce ``recipe`` as closely as this space can.

    Values are read where each slot applies (its group's first layer, or its control point, on a
    tensor of the base model's layer stack that the slot's filter takes), clipped into the search
    ranges. Raises :class:`SpaceError` when the recipe does not fit (another method, other models).
    """
    if recipe.merge_method not in space.methods:
        raise SpaceError(f"start recipe uses {recipe.merge_method!r}; this space searches "
                         f"{list(space.methods)}", "search space")
    method = recipe.merge_method
    by_path = {str(m.model): m.parameters or {} for m in recipe.models or ()}
    names = {m.name: m.model for m in space.inputs(method)}
    missing = [path for path in names.values() if path not in by_path]
    if missing:
        raise SpaceError(f"start recipe does not list {missing}; it must merge the space's models",
                         "search space")
    spec = method_spec(method)
    probe = _Probe(space)
    params = _method_genes(space, method)
    layers = knot_layers(space) if space.smooth else [a for a, _ in space.layer_groups()]
    for slot in slots(space, method):
        layer = layers[slot.group] if slot.group is not None else 0
        t = layer_position(layer, space.num_layers)
        levels = [by_path[names[slot.model]]] if slot.model is not None else []
        value = resolve([*levels, recipe.parameters], slot.param, probe.tensor(slot.filter, layer), t)
        if not isinstance(value, (int, float)):
            value = spec.param(slot.param).default
        params[slot.name] = _within(slot.distribution, value)
    for param in searched_switches(space, method):
        value = evaluate_setting((recipe.parameters or {}).get(param), "", 0.0)
        params[param] = bool(value) if isinstance(value, bool) else bool(spec.param(param).default)
    return params


class _Probe:
    """A tensor name of a given layer that a given filter takes first (or, for the remainder,
    that no filter takes), from the base model's own layer stack (read once, from its headers).
    A space whose models are not at hand (``num_layers`` given) gets names made of the filter
    alone: filter entries match by substring and gradients by layer position, not by name."""

    def __init__(self, space: SearchSpace) -> None:
        self.filters = space.filters
        self.layout = base_layout(space)

    def tensor(self, filt: str | None, layer: int) -> str:
        if self.layout is None:
            return filt if filt is not None else "~"  # "~" is in no filter (filters are names)
        prefix = self.layout.prefix
        for suffix in self.layout.suffixes:
            name = f"{prefix}{layer}.{suffix}"
            if next((f for f in self.filters if f in name), None) == filt:
                return name
        return f"{prefix}{layer}.{filt}.weight" if filt is not None else f"{prefix}{layer}.~"


def base_layout(space: SearchSpace) -> LayerLayout | None:
    """The layer stack of the space's base (else first) model, from its config and tensor names;
    None when that model cannot be read here."""
    from merge_engine.errors import MergeError
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    try:
        path = resolve_model_dir(ModelRef.parse((space.base_model or space.models[0]).model))
        with CheckpointReader(path) as reader:
            return detect_layout(reader.tensor_names, reader.config)
    except (MergeError, ValueError, OSError):
        return None


# ---------------------------------------------------------------- helpers
def _method_genes(space: SearchSpace, method: str) -> dict[str, Any]:
    """The genes choosing ``method`` everywhere (one per layer group with ``layer_methods``)."""
    if space.layer_methods:
        return {g: method for g in group_method_genes(group_labels(space))}
    return {"method": method} if len(space.methods) > 1 else {}


def _suggest(trial: Any, slot: Slot) -> Any:
    d = slot.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(slot.name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(slot.name, d.low, d.high, log=d.log)
    return trial.suggest_float(slot.name, d.low, d.high, log=d.log)


def _plain(value: Any) -> Any:
    """Round floats for readable recipes (1e-6 relative is far below any merge's sensitivity)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _within(dist: BaseDistribution, value: Any) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return value if value in dist.choices else dist.choices[0]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        value = (dist.low + dist.high) / 2
    value = min(max(value, dist.low), dist.high)
    return int(round(value)) if isinstance(dist, IntDistribution) else float(value)
