"""The MoE search space (first part): which experts, which of their prompts, the gate mode and the
experts per token, as readable genes; a trial becomes one mergekit-moe config.

    space = MoESpace.model_validate(yaml.safe_load(text))
    dists = moe_distributions(space)      # every gene a study may suggest, by name
    config = trial_moe_config(space, trial)   # any optuna trial (FixedTrial too) -> MoEConfig

Genes (each present only when it varies): ``use.<expert>`` (include the expert), ``prompt.<expert>.<j>``
(the expert's j-th pool prompt is one of its positive prompts), ``gate_mode``, ``experts_per_token``
(clamped to the number of experts chosen). A trial whose config breaks a rule of
:func:`merge_engine.moe.config.config_problems` (too few experts, an expert without prompts,
every expert with the same prompts) raises ``optuna.TrialPruned`` naming the rule: the study
records it and goes on. A search space file with a ``moe:`` block adds the parameter-space merge
of the shared weights and the search settings (:mod:`evomerge.moe.search_space`).
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from pydantic import field_validator, model_validator

from evomerge.space.schema import ModelEntry
from merge_engine.moe.config import GATE_MODES, RANDOM_MODES, MoEConfig, config_problems, parse_moe_config
from merge_engine.recipe import Frozen

CHOICES = (False, True)


class ExpertCandidate(ModelEntry):
    """An expert the search may include, with its pool of prompts (searched subset) and fixed
    negative prompts. ``prompts`` omitted: the space's shared ``prompt_pool``."""

    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None


class MoESpace(Frozen):
    """What an MoE search may vary (see the module docstring for the genes)."""

    base_model: str
    experts: list[ExpertCandidate]
    prompt_pool: list[str] | None = None
    min_experts: int = 2
    gate_modes: list[str] = ["hidden"]
    experts_per_token: tuple[int, int] = (2, 2)
    dtype: str | None = None
    architecture: str | None = None
    shared_experts: list[dict[str, Any]] | None = None

    @field_validator("gate_modes")
    @classmethod
    def _modes(cls, modes: list[str]) -> list[str]:
        unknown = [m for m in modes if m not in GATE_MODES]
        if unknown or not modes:
            raise ValueError(f"gate_modes {modes} must be a non-empty list of {', '.join(GATE_MODES)}")
        return modes

    @model_validator(mode="after")
    def _rules(self) -> MoESpace:
        problems = []
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            problems.append(f"experts: names {names} repeat; give each a distinct name")
        if not 1 <= self.min_experts <= len(self.experts):
            problems.append(f"min_experts: {self.min_experts} must be between 1 and the {len(self.experts)} experts")
        low, high = self.experts_per_token
        if not 1 <= low <= high:
            problems.append(f"experts_per_token: [{low}, {high}] must satisfy 1 <= low <= high")
        prompted = any(m not in RANDOM_MODES for m in self.gate_modes)
        for e in self.experts:
            if prompted and not (e.prompts or self.prompt_pool):
                problems.append(f"experts.{e.name}: no prompts and no prompt_pool; the gate modes "
                                f"{self.gate_modes} need prompts to choose from")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def pool(self, expert: ExpertCandidate) -> list[str]:
        return list(expert.prompts or self.prompt_pool or [])


def moe_distributions(space: MoESpace) -> dict[str, BaseDistribution]:
    """Every gene of ``space``, by name, in a stable order."""
    dists: dict[str, BaseDistribution] = {}
    optional = len(space.experts) > space.min_experts
    prompted = any(m not in RANDOM_MODES for m in space.gate_modes)
    for e in space.experts:
        if optional:
            dists[f"use.{e.name}"] = CategoricalDistribution(CHOICES)
        pool = space.pool(e) if prompted else []
        if len(pool) > 1:
            for j in range(len(pool)):
                dists[f"prompt.{e.name}.{j}"] = CategoricalDistribution(CHOICES)
    if len(space.gate_modes) > 1:
        dists["gate_mode"] = CategoricalDistribution(tuple(space.gate_modes))
    low, high = space.experts_per_token
    if high > low:
        dists["experts_per_token"] = IntDistribution(low, high)
    return dists


def trial_moe_config(space: MoESpace, trial: Any) -> MoEConfig:
    """The MoE config ``trial`` proposes; ``optuna.TrialPruned`` (one line) for an infeasible one."""
    import optuna

    values = {name: _suggest(trial, name, d) for name, d in moe_distributions(space).items()}
    gate_mode = values.get("gate_mode", space.gate_modes[0])
    chosen = [e for e in space.experts if values.get(f"use.{e.name}", True)]
    if len(chosen) < space.min_experts:
        raise optuna.TrialPruned(f"{len(chosen)} experts chosen; the space needs at least {space.min_experts}")
    experts = []
    for e in chosen:
        pool = space.pool(e)
        picked = [p for j, p in enumerate(pool) if values.get(f"prompt.{e.name}.{j}", True)]
        entry: dict[str, Any] = {"source_model": e.model}
        if gate_mode not in RANDOM_MODES:
            entry["positive_prompts"] = picked
            if e.negative_prompts:
                entry["negative_prompts"] = list(e.negative_prompts)
        experts.append(entry)
    data: dict[str, Any] = {"base_model": space.base_model, "experts": experts, "gate_mode": gate_mode,
                            "experts_per_token": min(values.get("experts_per_token", space.experts_per_token[0]),
                                                     len(experts))}
    for key in ("dtype", "architecture", "shared_experts"):
        if getattr(space, key) is not None:
            data[key] = getattr(space, key)
    config = MoEConfig.model_validate(data)
    problems = config_problems(config)
    if problems:
        raise optuna.TrialPruned(problems[0])
    return parse_moe_config(data)


def _suggest(trial: Any, name: str, d: BaseDistribution) -> Any:
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    return trial.suggest_int(name, d.low, d.high)
