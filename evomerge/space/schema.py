"""The search-space file format: frozen pydantic models and their cross-field rules.

A :class:`SearchSpace` is pure configuration: which models, which method(s), which method
parameters are searched (and how), how candidates are scored, and the search settings. Every
rule adds one line to the list of problems (the rule and the offending value), so a space
reports all its problems at once. Turning a space into searched numbers and recipes is
:mod:`evomerge.space.genome`; reading one from YAML is :mod:`evomerge.space.load`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from evomerge.errors import ProblemsError
from evomerge.evaluate import EvalConfig, load_preset
from evomerge.space.layer_path import LayerPath
from evomerge.space.objectives import SCORE, directions, split_weighted_entries
from evomerge.space.rungs import Fidelity
from evomerge.space.stages import StagesRef
from merge_engine.apply import DEFAULT_TASK_VECTOR_CACHE_BYTES
from merge_engine.dtypes import DTYPE_NAMES, MODEL_DTYPE_NAMES
from merge_engine.methods.spec import MethodSpec
from merge_engine.recipe import Frozen
from merge_engine.sizes import parse_bytes

REST = "rest"    # the name of the filter entry that matches every tensor no filter took
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class SpaceError(ProblemsError):
    """A search space is invalid. ``problems`` lists every problem found, one line each."""


# ---------------------------------------------------------------- parameters with space-level rules
@dataclass(frozen=True)
class GeneRule:
    """How a space treats one method parameter beyond the registry's declaration of it.

    ``switch``: a top-level space field (e.g. ``normalize``) that fixes the parameter for every
    method taking it (``true``/``false``) or searches it as one categorical gene of the same name
    (``"search"``); such a parameter is never searched by default. ``signed_by``: a boolean space
    field that lets the parameter's range go below 0 (the default range is then mirrored to
    ``[-high, high]``). ``equal_share``: the ``equal`` start point gives it 1/N per model.
    """

    param: str
    switch: str | None = None
    signed_by: str | None = None
    equal_share: bool = False


# Adding a search parameter kind: a row here (+ its space field below when it has a switch or flag).
GENE_RULES: dict[str, GeneRule] = {
    "weight": GeneRule("weight", signed_by="allow_negative_weights", equal_share=True),
    "normalize": GeneRule("normalize", switch="normalize"),
}
SWITCH_CHOICES = (False, True)  # the categorical gene of a switch set to "search"


def switches(space: SearchSpace) -> dict[str, bool | str]:
    """``{param: True/False/"search"}`` for every switch the space sets."""
    return {r.param: v for r in GENE_RULES.values() if r.switch and (v := getattr(space, r.switch)) is not None}


def signed(space: SearchSpace, param: str) -> bool:
    """Whether the space lets ``param`` go below 0."""
    rule = GENE_RULES.get(param)
    return rule is None or rule.signed_by is None or bool(getattr(space, rule.signed_by))


# ---------------------------------------------------------------- models
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


class SearchSpace(Frozen):
    """Which merges a search may propose, how candidates are scored, and the search settings.

    See ``search_spaces/*.yaml`` for the file format. ``num_layers`` is filled in by
    :func:`evomerge.space.load_space` from the base model's ``config.json``. ``sampler`` is a
    name of :data:`evomerge.search.samplers.SAMPLERS` (checked by ``parse_space``).
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
    layer_path: LayerPath | None = None  # search the layer path, not merge parameters
    stages: StagesRef | None = None  # fixed stages around the searched one (evomerge.space.stages)
    layer_methods: bool = False  # each layer group picks its method (evomerge.space.stages)
    filters: tuple[str, ...] = ()
    smooth: bool = False
    dtype: Literal[MODEL_DTYPE_NAMES] = "float32"
    lora_merge_dtype: Literal[DTYPE_NAMES] | None = None  # base+adapter models' merge dtype (mergekit's option)
    # the most a run keeps of merge work no candidate changes (task vectors, magnitude
    # histograms): a size (4GiB) or bytes; past it the rest is recomputed per candidate; 0: off
    task_vector_cache: int = DEFAULT_TASK_VECTOR_CACHE_BYTES
    num_layers: int = Field(ge=1)
    eval: EvalConfig
    report_eval: EvalConfig | None = None
    objectives: tuple[str, ...] = (SCORE,)
    objective_weights: dict[str, float] = Field(default_factory=dict)  # short form: objectives entries' weight
    sampler: str | None = None
    budget: Budget = Budget()
    pruning: Pruning | None = None
    fidelity: Fidelity | None = None
    start: tuple[StartPoint, ...] = (StartPoint(equal=True),)
    seed: int = 0
    top_k: int = Field(default=3, ge=1)

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
        if "objectives" in data:  # entries {name, weight}: names here, weights in objective_weights
            data["objectives"], weights = split_weighted_entries(data["objectives"])
            if weights:
                data["objective_weights"] = {**(data.get("objective_weights") or {}), **weights}
        if isinstance(data.get("filters"), str):
            data["filters"] = (data["filters"],)
        if isinstance(data.get("start"), (str, Mapping)):
            data["start"] = (data["start"],)
        for key in ("eval", "report_eval"):
            data[key] = _expand_preset(key, data.get(key))
        # report_eval lists only what differs from eval (typically the held-out task names).
        rep, ev = data.get("report_eval"), data.get("eval")
        if isinstance(rep, Mapping) and isinstance(ev, Mapping):
            data["report_eval"] = {**ev, **rep}
        return data

    @field_validator("task_vector_cache", mode="before")
    @classmethod
    def _cache_size(cls, value: Any) -> int:
        return parse_bytes(value)

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
        from evomerge.space.rules import space_problems  # the rules read this module's models

        problems = space_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ------------------------------------------------------------ simple views
    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)

    @property
    def directions(self) -> list[str]:
        """Optuna directions, one per objective (:mod:`evomerge.space.objectives`)."""
        return directions(self)

    def all_models(self) -> list[ModelEntry]:
        """The base model (if any) then the other models."""
        return ([self.base_model] if self.base_model else []) + list(self.models)

    def inputs(self, method: str) -> tuple[ModelEntry, ...]:
        """Models that get per-model parameters: with a base-less method the base is one of them."""
        if method_spec(method).base == "unused" and self.base_model is not None:
            return (self.base_model, *self.models)
        return self.models

    def layer_groups(self) -> list[tuple[int, int]]:
        """Inclusive (first, last) layer of each group; one group when no granularity is set."""
        g = self.layer_granularity or self.num_layers
        return [(a, min(a + g, self.num_layers) - 1) for a in range(0, self.num_layers, g)]


def _expand_preset(key: str, block: Any) -> Any:
    """``{preset: NAME, **overrides}`` → the preset's fields with the overrides on top.

    NAME is a preset under ``eval_tasks/presets/`` or a YAML path (``load_space`` makes a
    relative path relative to the space file). An unknown preset is one ``ValueError`` line.
    """
    if not isinstance(block, Mapping) or "preset" not in block:
        return block
    rest = dict(block)
    name = rest.pop("preset")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{key}.preset must be a preset name or a YAML path, got {name!r}")
    try:
        preset = load_preset(name)
    except ValueError as err:  # EvalConfigError (unknown name) or the preset's own problems
        raise ValueError(f"{key}.preset: {err}") from None
    return {**preset.model_dump(exclude_unset=True), **rest}


# ---------------------------------------------------------------- rules
def method_spec(method: str) -> MethodSpec:
    from merge_engine.methods.registry import get_method

    return get_method(method)


def registry_range(methods: Sequence[str], name: str) -> tuple[float, float]:
    """The union of the methods' default search ranges of parameter ``name``."""
    ranges = [p.search for m in methods if (p := method_spec(m).param(name)) is not None and p.search]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)
