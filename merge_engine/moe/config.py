"""mergekit-moe's configuration file, read unchanged, and the rules it must meet before any model
is opened.

The keys and their meanings are mergekit-moe's: ``base_model`` gives every tensor outside the
MLPs (and, for the ``hidden`` gate modes, the hidden states the routers are built from);
``experts`` each give their MLPs to one expert slot; ``gate_mode`` says how router rows are
initialised; ``experts_per_token`` is the top-k; ``shared_experts`` (Qwen2-MoE output only) give
the always-on expert; ``architecture`` names the output architecture (a prefix of a name in
:data:`ARCHITECTURE_NAMES`, case-insensitive), else it is chosen from the models.

Rules (all problems reported at once, one line each, by :func:`config_problems`, which the build
runs before opening any model): a known gate
mode; 1 <= experts_per_token <= number of experts; every expert (and shared expert) has positive
prompts unless the gate mode is random; with two or more experts, not every expert has the same
prompts and, unless ``allow_same_experts``, not every expert is the same model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator

from merge_engine.dtypes import canonical_dtype_name
from merge_engine.errors import RecipeError, validation_problems
from merge_engine.recipe import Frozen, Ref, expand_vars

#: gate modes (mergekit's): ``hidden``/``hidden_last`` use the last prompt token's hidden state at
#: each layer's input, ``hidden_avg`` the average over the (padded) sequence, ``cheap_embed`` the
#: prompts' summed token embeddings (same for every layer), ``random`` standard normal rows,
#: ``uniform_random`` torch.nn.Linear's default initialisation.
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")
#: output architectures, in the order they are tried when ``architecture`` is not given
ARCHITECTURE_NAMES = ("Mixtral", "Qwen MoE", "Qwen3 MoE")


class Expert(Frozen):
    """One dense model contributing its MLPs as an expert (or the shared expert)."""

    source_model: Ref
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompts_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(Frozen):
    """A mergekit-moe configuration (frozen; unknown keys refused)."""

    base_model: Ref
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else canonical_dtype_name(value)

    def gated_experts(self) -> list[Expert]:
        """The experts that get a router row: every routed expert, then the shared experts
        when they have prompts or the gate mode is random (mergekit's rule)."""
        shared = list(self.shared_experts or [])
        if shared and (any(e.positive_prompts for e in shared) or self.gate_mode in RANDOM_MODES):
            return list(self.experts) + shared
        return list(self.experts)


def config_problems(config: MoEConfig, *, allow_same_experts: bool = False) -> list[str]:
    """Every rule of the file (no model opened) that ``config`` breaks, one line each."""
    problems: list[str] = []
    n = len(config.experts)
    if config.gate_mode not in GATE_MODES:
        problems.append(f"gate_mode: {config.gate_mode!r} is unknown; use one of {', '.join(GATE_MODES)}")
    if n == 0:
        problems.append("experts: the list is empty; give at least one expert model")
    if config.experts_per_token < 1:
        problems.append(f"experts_per_token: {config.experts_per_token} must be at least 1")
    elif n and config.experts_per_token > n:
        problems.append(f"experts_per_token: {config.experts_per_token} is more than the {n} experts; "
                        f"lower it to at most {n} or add experts")
    if config.architecture is not None and _architecture_matches(config.architecture) == ():
        problems.append(f"architecture: {config.architecture!r} names no output architecture; "
                        f"use one of {', '.join(ARCHITECTURE_NAMES)}")
    for where, expert in _all_experts(config):
        if config.gate_mode not in RANDOM_MODES and not where.startswith("shared") and not expert.positive_prompts:
            problems.append(f"{where}: no positive_prompts; gate_mode {config.gate_mode} builds the router "
                            "from them (give some, or use gate_mode: random)")
        for key in ("noise_scale", "residual_scale"):
            value = getattr(expert, key)
            if value is not None and not math.isfinite(value):
                problems.append(f"{where}.{key}: {value} is not finite; give a finite number")
    if n >= 2 and config.gate_mode not in RANDOM_MODES:
        if len({e.prompts_key() for e in config.experts}) == 1:
            problems.append("experts: every expert has the same prompts, so the router cannot tell them "
                            "apart; give each expert prompts of what it should receive")
    if n >= 2 and not allow_same_experts and len({e.source_model for e in config.experts}) == 1:
        problems.append("experts: every expert is the same model, which only costs memory without "
                        "training; use different models (or --allow-same-experts if you will train it)")
    return problems


def _all_experts(config: MoEConfig) -> list[tuple[str, Expert]]:
    return ([(f"experts[{i}]", e) for i, e in enumerate(config.experts)]
            + [(f"shared_experts[{i}]", e) for i, e in enumerate(config.shared_experts or [])])


def _architecture_matches(name: str) -> tuple[str, ...]:
    """The output architecture names that ``name`` is a prefix of (case-insensitive), as mergekit."""
    return tuple(a for a in ARCHITECTURE_NAMES if a.lower().startswith(name.lower()))


def parse_moe_config(data: Any, *, source: str = "MoE config") -> MoEConfig:
    """A :class:`MoEConfig` from parsed YAML (schema and the file's rules); RecipeError listing
    every problem. ``allow_same_experts`` is the build's to give, so that rule is left to it."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source} must be a mapping with base_model and experts; see docs/moe.md")
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as err:
        raise RecipeError([f"{source}: {p}" for p in validation_problems(err)]) from None
    problems = config_problems(config, allow_same_experts=True)
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    return config


def load_moe_config(path: str | Path, variables: Mapping[str, str] | None = None) -> MoEConfig:
    """Read a mergekit-moe YAML file (``${NAME}`` filled from ``variables``, then the environment)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"MoE config {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"{path} is not valid YAML ({first}); fix the syntax") from None

    def unset(name: str) -> RecipeError:
        return RecipeError(f"{path}: ${{{name}}} is not set; pass --var {name}=VALUE or export {name}=...")
    data = expand_vars(data, variables or {}, unset)
    return parse_moe_config(data, source=str(path))
