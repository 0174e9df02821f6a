"""Search spaces as data: a YAML file that says which merges a search may propose.

A :class:`SearchSpace` is a frozen pydantic model loaded with :func:`load_space`. It turns an
Optuna trial into a :class:`~merge_engine.recipe.MergeRecipe`:

    space = load_space("search_spaces/zoo_demo.yaml")
    recipe = space.recipe(trial)          # any optuna trial, including FixedTrial

Lifecycle: the space is built once per run (``load_space`` reads the YAML and the base model's
``config.json`` for the number of layers; no tensors); :meth:`SearchSpace.recipe` is called once
per candidate; :meth:`SearchSpace.start_points` once when a study is created.

Parameter names are readable and stable: ``<layers>.<filter>.<model>.<param>``, each part present
only when it varies, e.g. ``layers_00_07.mlp.math.weight``, ``math.density`` or ``lambda``. With
``smooth: true`` the layer part names a gradient control point (``layer_07``) instead of a group.
Which parameters a method has, their valid ranges and default search ranges come from the method
registry (``merge_engine.methods.registry``); this module keeps no table of its own.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.evaluate import EvalConfig
from evomerge.space_rules import SCORE, method_spec as _spec, registry_range
from evomerge.variables import VAR, expand_vars as _expand
from merge_engine.methods.spec import MethodSpec, Param
from merge_engine.recipe import Frozen, MergeRecipe, evaluate_setting, parse_recipe, resolve

GP_MAX_PARAMS = 16  # up to this many searched parameters the default single-objective sampler is GP
SAMPLERS = ("cmaes", "tpe", "gp", "random", "nsga2")
REST = "rest"    # the name of the filter entry that matches every tensor no filter took
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_VAR = VAR


class SpaceError(EvomergeError):
    """A search space is invalid. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str] | str, source: str = "search space") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = f"{source}: {self.problems[0]}"
        else:
            msg = f"{source}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(msg)




class ModelEntry(Frozen):
    """An input model with a short readable name (used in parameter names)."""

    name: str
    model: str

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):  # "path" → name from the last path component
            return {"name": _default_name(value), "model": value}
        return value

    @field_validator("name")
    @classmethod
    def _readable(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"model name {name!r} must start with a letter and hold only letters, "
                             "digits, '_' or '-' (it becomes part of parameter names)")
        return name


def _default_name(path: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9_-]", "_", path.rstrip("/").split("/")[-1].split("@")[0])
    return tail if tail[:1].isalpha() else "m_" + tail


class SearchParam(Frozen):
    """How one method parameter is searched.

    Short forms: ``[low, high]``; ``true``/``default``/``{}`` for the registry's search range.
    ``layered`` gives the parameter its own value per layer group and filter (default: yes for
    per-model parameters, no for global ones). ``choices`` searches a categorical (bool params).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    layered: bool | None = None
    choices: tuple[Union[bool, int, float], ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if value is None or value is True or value == "default":
            return {}
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in value):
                raise ValueError(f"a range is [low, high] with two numbers, got {list(value)!r}")
            return {"low": value[0], "high": value[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SearchParam:
        if self.low is not None and self.high is not None:
            if not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ValueError(f"range [{self.low}, {self.high}] must be finite")
            if self.low > self.high:
                raise ValueError(f"range [{self.low}, {self.high}] has low > high; swap them")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0, got {self.low}")
        if (self.low is None) != (self.high is None):
            raise ValueError("give both low and high, or neither (registry default)")
        return self


class Budget(Frozen):
    """When the search stops: ``trials`` finished trials (COMPLETE or PRUNED) or ``timeout`` s."""

    trials: int = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    max_failures: int | None = Field(default=None, ge=1)


class Pruning(Frozen):
    """Cheap-first evaluation: score ``limit`` docs per task first; stop candidates below the
    ``percentile`` of earlier ones (after ``startup_trials``) before the full evaluation."""

    limit: int = Field(ge=1)
    percentile: float = Field(default=50.0, gt=0, lt=100)
    startup_trials: int = Field(default=5, ge=0)


class StartPoint(Frozen):
    """A candidate evaluated first: ``equal`` weights, a known-good ``recipe`` file, or ``params``."""

    equal: bool = False
    recipe: str | None = None
    params: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if value == "equal":
            return {"equal": True}
        if isinstance(value, str):
            return {"recipe": value}
        return value

    @model_validator(mode="after")
    def _one(self) -> StartPoint:
        if sum([self.equal, self.recipe is not None, self.params is not None]) != 1:
            raise ValueError("a start point is 'equal', {recipe: PATH} or {params: {...}}")
        return self


@dataclass(frozen=True)
class Slot:
    """One searched number: its readable name, distribution and where it lands in the recipe."""

    name: str
    param: str
    model: str | None           # None: a global parameter
    group: int | None           # layer group / control point index; None: not layered
    filter: str | None          # None: no filters, or the remainder entry when filters are used
    distribution: BaseDistribution


class SearchSpace(Frozen):
    """Which merges a search may propose, how candidates are scored, and the search settings.

    See the module docstring and ``search_spaces/*.yaml`` for the file format. ``num_layers`` is
    filled in by :func:`load_space` from the base model's ``config.json``.
    """

    name: str = "search"
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    base_model: ModelEntry | None = None
    method: Union[str, tuple[str, ...]]
    search: dict[str, SearchParam] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    normalize: Union[bool, Literal["search"], None] = None
    allow_negative_weights: bool = False
    layer_granularity: int | None = Field(default=None, ge=1)
    filters: tuple[str, ...] = ()
    smooth: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_layers: int = Field(ge=1)
    eval: EvalConfig
    report_eval: EvalConfig | None = None
    objectives: tuple[str, ...] = (SCORE,)
    sampler: Literal["cmaes", "tpe", "gp", "random", "nsga2"] | None = None
    budget: Budget = Budget()
    pruning: Pruning | None = None
    start: tuple[StartPoint, ...] = (StartPoint(equal=True),)
    seed: int = 0
    top_k: int = Field(default=3, ge=1)

    # ------------------------------------------------------------ input forms
    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if isinstance(data.get("base_model"), str):
            data["base_model"] = {"name": "base", "model": data["base_model"]}
        if isinstance(data.get("method"), list):
            data["method"] = tuple(data["method"])
        if isinstance(data.get("objectives"), str):
            data["objectives"] = (data["objectives"],)
        if isinstance(data.get("filters"), str):
            data["filters"] = (data["filters"],)
        if isinstance(data.get("start"), (str, Mapping)):
            data["start"] = (data["start"],)
        # report_eval lists only what differs from eval (typically the held-out task names).
        rep, ev = data.get("report_eval"), data.get("eval")
        if isinstance(rep, Mapping) and isinstance(ev, Mapping):
            data["report_eval"] = {**ev, **rep}
        return data

    @field_validator("filters")
    @classmethod
    def _filters(cls, filters: tuple[str, ...]) -> tuple[str, ...]:
        for f in filters:
            if not f or not re.match(r"^[A-Za-z0-9_.-]+$", f) or f == REST:
                raise ValueError(f"filter {f!r} must be a non-empty tensor-name substring of letters, "
                                 f"digits, '_', '-', '.' and not {REST!r} (the remainder is implied)")
        if len(set(filters)) != len(filters):
            raise ValueError(f"filters {list(filters)} repeat a name; list each once")
        return filters

    @model_validator(mode="after")
    def _cross_field(self) -> SearchSpace:
        from evomerge.space_rules import space_problems

        problems = space_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ------------------------------------------------------------ views
    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)

    @property
    def directions(self) -> list[str]:
        """Optuna directions, one per objective (a negative task weight means minimize)."""
        weights = {t.name: t.weight for t in self.eval.tasks}
        return ["maximize" if o == SCORE or weights[o] > 0 else "minimize" for o in self.objectives]

    @property
    def default_sampler(self) -> str:
        """The space's ``sampler``, else: NSGA-II for several objectives; for one, a Gaussian
        process while the space has at most ``GP_MAX_PARAMS`` parameters (far fewer evaluations
        than CMA-ES at that size: results/benchmarks/search_efficiency.md), CMA-ES above."""
        if self.sampler:
            return self.sampler
        if len(self.objectives) > 1:
            return "nsga2"
        return "gp" if len(self.distributions()) <= GP_MAX_PARAMS else "cmaes"

    def inputs(self, method: str) -> tuple[ModelEntry, ...]:
        """Models that get per-model parameters: with a base-less method the base is one of them."""
        spec = _spec(method)
        if spec.base == "unused" and self.base_model is not None:
            return (self.base_model, *self.models)
        return self.models

    def layer_groups(self) -> list[tuple[int, int]]:
        """Inclusive (first, last) layer of each group; one group when no granularity is set."""
        g = self.layer_granularity or self.num_layers
        return [(a, min(a + g, self.num_layers) - 1) for a in range(0, self.num_layers, g)]

    def group_labels(self) -> list[str]:
        """Readable layer part of parameter names: groups (steps) or control points (smooth)."""
        width = max(2, len(str(self.num_layers - 1)))
        if self.smooth:
            return [f"layer_{pos:0{width}d}" for pos in self._knot_layers()]
        return [f"layers_{a:0{width}d}_{b:0{width}d}" for a, b in self.layer_groups()]

    def _knot_layers(self) -> list[int]:
        n, last = len(self.layer_groups()), self.num_layers - 1
        return [0] if n == 1 else [round(k * last / (n - 1)) for k in range(n)]

    def slots(self, method: str) -> list[Slot]:
        """Every searched number of ``method``, in a stable order."""
        spec = _spec(method)
        labels = self.group_labels()
        filters: list[str | None] = [*self.filters, None] if self.filters else [None]
        out: list[Slot] = []
        for param in self._searched_params(spec):
            dist = self._distribution(param)
            layered = self._layered(param) and not isinstance(dist, CategoricalDistribution)
            owners: list[str | None] = [m.name for m in self.inputs(method)] if param.per_model else [None]
            for owner in owners:
                for gi, label in enumerate(labels) if layered else [(None, None)]:
                    for f in filters if layered else [None]:
                        parts = [label if layered and len(labels) > 1 else None,
                                 (f or REST) if layered and self.filters else None, owner, param.name]
                        name = ".".join(p for p in parts if p is not None)
                        out.append(Slot(name, param.name, owner, gi, f, dist))
        return out

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter the search may suggest (union over methods), by name."""
        dists: dict[str, BaseDistribution] = {}
        if len(self.methods) > 1:
            dists["method"] = CategoricalDistribution(self.methods)
        for method in self.methods:
            dists.update({s.name: s.distribution for s in self.slots(method)})
        if self.normalize == "search":
            dists["normalize"] = CategoricalDistribution((False, True))
        return dists

    # ------------------------------------------------------------ trial → recipe
    def recipe(self, trial: Any) -> MergeRecipe:
        """The recipe ``trial`` proposes (suggests every parameter of the chosen method)."""
        method = trial.suggest_categorical("method", self.methods) if len(self.methods) > 1 \
            else self.methods[0]
        values = {s.name: _suggest(trial, s) for s in self.slots(method)}
        if self.normalize == "search" and _spec(method).param("normalize") is not None:
            values["normalize"] = trial.suggest_categorical("normalize", (False, True))
        return self.build_recipe(method, values)

    def build_recipe(self, method: str, values: Mapping[str, Any]) -> MergeRecipe:
        """The recipe for ``method`` with searched ``values`` by parameter name (pure)."""
        spec = _spec(method)
        per_model: dict[str, dict[str, Any]] = {m.name: {} for m in self.inputs(method)}
        top: dict[str, Any] = {k: v for k, v in self.parameters.items() if spec.param(k) is not None}
        if isinstance(self.normalize, bool) and spec.param("normalize") is not None:
            top["normalize"] = self.normalize
        if "normalize" in values:
            top["normalize"] = values["normalize"]
        by_target: dict[tuple[str, str | None], list[Slot]] = {}
        for slot in self.slots(method):
            by_target.setdefault((slot.param, slot.model), []).append(slot)
        for (param, owner), slots in by_target.items():
            setting = self._setting(slots, values)
            (per_model[owner] if owner is not None else top)[param] = setting
        data: dict[str, Any] = {"merge_method": method, "dtype": self.dtype, "seed": self.seed}
        if spec.base != "unused" and self.base_model is not None:
            data["base_model"] = self.base_model.model
        data["models"] = [{"model": m.model, **({"parameters": per_model[m.name]} if per_model[m.name] else {})}
                          for m in self.inputs(method)]
        if top:
            data["parameters"] = top
        return parse_recipe(data, source=f"search space {self.name}")

    def _setting(self, slots: list[Slot], values: Mapping[str, Any]) -> Any:
        """Scalar, per-layer list (steps), control points (smooth) or filter entries."""
        if slots[0].group is None:
            return _plain(values[slots[0].name])
        entries = []
        for f in [*self.filters, None] if self.filters else [None]:
            points = [_plain(values[s.name]) for s in slots if s.filter == f]
            if len(set(map(repr, points))) == 1:  # one value everywhere reads best as a number
                value: Any = points[0]
            elif self.smooth:
                value = points
            else:  # steps: one value per layer, v[i] at layer i
                value = [points[gi] for gi, (a, b) in enumerate(self.layer_groups()) for _ in range(a, b + 1)]
            entries.append({"filter": f, "value": value} if f is not None else {"value": value})
        return entries if self.filters else entries[0]["value"]

    # ------------------------------------------------------------ start points
    def start_points(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) for each start point, ready for ``study.enqueue_trial``.

        Recipe paths were made absolute (relative to the space file) when the space was loaded.
        """
        from merge_engine.recipe import load_recipe

        out = []
        for sp in self.start:
            if sp.equal:
                out.append(("equal", self.equal_params()))
            elif sp.params is not None:
                out.append(("params", dict(sp.params)))
            else:
                out.append((f"recipe:{sp.recipe}", self.params_from_recipe(load_recipe(sp.recipe))))
        return out

    def equal_params(self, method: str | None = None) -> dict[str, Any]:
        """Every model weighted the same (1/N, or the range's middle); other params at defaults."""
        method = method or self.methods[0]
        spec = _spec(method)
        n = len(self.inputs(method))
        params: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
        for slot in self.slots(method):
            p = spec.param(slot.param)
            preferred = 1.0 / n if slot.param == "weight" else p.default
            params[slot.name] = _within(slot.distribution, preferred)
        if self.normalize == "search" and spec.param("normalize") is not None:
            params["normalize"] = bool(spec.param("normalize").default)
        return params

    def params_from_recipe(self, recipe: MergeRecipe) -> dict[str, Any]:
        """The searched values that reproduce ``recipe`` as closely as this space can.

        Values are read where each slot applies (its group's first layer, or its control point),
        clipped into the search ranges. Raises :class:`SpaceError` when the recipe does not fit
        (another method, other models).
        """
        if recipe.merge_method not in self.methods:
            raise SpaceError(f"start recipe uses {recipe.merge_method!r}; this space searches "
                             f"{list(self.methods)}")
        method = recipe.merge_method
        by_path = {str(m.model): m.parameters or {} for m in recipe.models or ()}
        names = {m.name: m.model for m in self.inputs(method)}
        missing = [path for path in names.values() if path not in by_path]
        if missing:
            raise SpaceError(f"start recipe does not list {missing}; it must merge the space's models")
        spec = _spec(method)
        params: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
        layers = self._knot_layers() if self.smooth else [a for a, _ in self.layer_groups()]
        for slot in self.slots(method):
            layer = layers[slot.group] if slot.group is not None else 0
            t = layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
            tensor = self._probe_tensor(slot.filter, layer)
            levels = [by_path[names[slot.model]]] if slot.model is not None else []
            value = resolve([*levels, recipe.parameters], slot.param, tensor, t)
            if not isinstance(value, (int, float)):
                value = spec.param(slot.param).default
            params[slot.name] = _within(slot.distribution, value)
        if self.normalize == "search" and spec.param("normalize") is not None:
            value = evaluate_setting((recipe.parameters or {}).get("normalize"), "", 0.0)
            params["normalize"] = bool(value) if isinstance(value, bool) else bool(spec.param("normalize").default)
        return params

    def _probe_tensor(self, filt: str | None, layer: int) -> str:
        if filt is not None:
            return f"model.layers.{layer}.{filt}.weight"
        for cand in ("input_layernorm.weight", "post_attention_layernorm.weight", "rest_of_layer"):
            name = f"model.layers.{layer}.{cand}"
            if not any(f in name for f in self.filters):
                return name
        return f"model.layers.{layer}.~"

    # ------------------------------------------------------------ ranges
    def _searched_params(self, spec: MethodSpec) -> list[Param]:
        if self.search is None:
            return [p for p in spec.params if p.search is not None and p.kind != "bool"
                    and p.name not in self.parameters and p.name != "normalize"]
        return [p for p in spec.params if p.name in self.search]

    def _layered(self, param: Param) -> bool:
        sp = (self.search or {}).get(param.name)
        return sp.layered if sp is not None and sp.layered is not None else param.per_model

    def _distribution(self, param: Param) -> BaseDistribution:
        """The same distribution for a name in every method (union of the registry ranges)."""
        sp = (self.search or {}).get(param.name) or SearchParam()
        if sp.choices is not None or param.kind == "bool":
            return CategoricalDistribution(sp.choices or (False, True))
        low, high = (sp.low, sp.high) if sp.low is not None else registry_range(self.methods, param.name)
        if param.name == "weight" and sp.low is None and self.allow_negative_weights and low >= 0:
            low = -high
        if param.kind == "int":
            return IntDistribution(int(low), int(high), log=sp.log)
        return FloatDistribution(float(low), float(high), log=sp.log)


# ---------------------------------------------------------------- helpers
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


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {e['loc'][-1]!r}; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing"
        for line in msg.split("\n"):
            problems.append(f"{loc}: {line}" if loc else line)
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------- loading
def expand_vars(value: Any, variables: Mapping[str, str]) -> Any:
    """Replace ``${NAME}`` in every string, from ``variables`` then the environment."""
    return _expand(value, variables, lambda key:
                   SpaceError(f"${{{key}}} is not set; pass it (e.g. export {key}=...) or edit the space"))


def _local_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Model paths written as ./x or ../x are relative to the space file, not the working dir."""
    def fix(entry: Any) -> Any:
        path = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(path, str) and path.startswith(("./", "../", "~")):
            path = str((base_dir / Path(path).expanduser()).resolve())
            return {**entry, "model": path} if isinstance(entry, dict) else path
        return entry

    if isinstance(data.get("models"), list):
        data["models"] = [fix(m) for m in data["models"]]
    if data.get("base_model") is not None:
        data["base_model"] = fix(data["base_model"])
    starts = data.get("start")
    starts = [starts] if isinstance(starts, (str, dict)) else starts
    if isinstance(starts, list):
        data["start"] = [{**s, "recipe": str(base_dir / s["recipe"])}
                         if isinstance(s, dict) and isinstance(s.get("recipe"), str) else s
                         for s in ({"recipe": s} if isinstance(s, str) and s != "equal" else s
                                   for s in starts)]
    for key in ("eval", "report_eval"):
        block = data.get(key)
        if isinstance(block, dict) and isinstance(block.get("include_paths"), list):
            block["include_paths"] = [str((base_dir / p).resolve()) if not Path(p).is_absolute() else p
                                      for p in block["include_paths"]]


def model_num_layers(path: str) -> int:
    """``num_hidden_layers`` from a model's config.json (no tensors are read)."""
    from merge_engine.errors import MergeError
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    try:
        folder = resolve_model_dir(ModelRef.parse(path))
    except (MergeError, ValueError) as err:
        raise SpaceError(f"model {path}: {err}") from None
    config = folder / "config.json"
    if not config.is_file():
        raise SpaceError(f"model {path} has no config.json; give a transformers model directory")
    cfg = json.loads(config.read_text())
    layers = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(layers, int):
        raise SpaceError(f"model {path}: config.json has no num_hidden_layers")
    return layers


def parse_space(data: Any, *, source: str = "search space", base_dir: Path | None = None,
                variables: Mapping[str, str] | None = None) -> SearchSpace:
    """Build a space from parsed YAML; every problem is reported in one :class:`SpaceError`."""
    if not isinstance(data, Mapping):
        raise SpaceError(f"expected a mapping with 'models' and 'method', got {type(data).__name__}",
                         source)
    data = expand_vars(dict(data), variables or {})
    if base_dir is not None:
        _local_paths(data, base_dir)
    problems: list[str] = []
    if "num_layers" not in data:
        counts: dict[str, int] = {}
        entries = [data.get("base_model")] + list(data.get("models") or [])
        for entry in entries:
            path = entry.get("model") if isinstance(entry, Mapping) else entry
            if isinstance(path, str):
                try:
                    counts[path] = model_num_layers(path)
                except SpaceError as err:
                    problems.append(err.problems[0])
        if len(set(counts.values())) > 1:
            problems.append(f"models have different numbers of layers {counts}; "
                            "this search merges models of one architecture")
        if counts:
            data["num_layers"] = next(iter(counts.values()))
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        problems += [p for p in _format_errors(err)
                     if not (problems and p.startswith("num_layers:"))]
        raise SpaceError(problems, source) from None
    if problems:
        raise SpaceError(problems, source)
    return space


def load_space(path: str | Path, variables: Mapping[str, str] | None = None) -> SearchSpace:
    """Read a search space YAML (``${VAR}`` expanded from ``variables`` or the environment)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"not valid YAML: {str(err).splitlines()[0]}; fix the syntax", str(path)) from None
    return parse_space(data, source=str(path), base_dir=path.parent.resolve(), variables=variables)
