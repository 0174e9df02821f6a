"""An MoE search space file: a search space whose ``moe:`` block makes each candidate an MoE.

    space = load_moe_space("search_spaces/zoo_moe.yaml", {"ZOO": zoo})
    recipe = trial_moe_recipe(space, trial)   # MoERecipe: the mergekit-moe config (+ shared merge)

The file is a search space (``search_spaces/*.yaml``): ``base_model`` is the MoE's base,
``models`` its expert candidates, ``eval``/``report_eval``/``budget``/``sampler``/``seed``/
``top_k``/``pruning`` as in every search. Two parts are searched:

* the MoE build (the ``moe:`` block, :class:`~evomerge.moe.space.MoESpace` without its
  ``base_model``/``experts``, which come from the file's models): ``prompts`` (expert name -> pool of
  prompts, searched subsets) or ``prompt_pool`` (one pool for all), ``negative_prompts`` (fixed),
  ``gate_modes``, ``experts_per_token`` [low, high], ``min_experts``, ``architecture``, ``dtype``;
* the shared (non-expert) weights, only when the file names a ``method``: a parameter-space
  merge of the base and the experts with the genes of any search (``search``, ``parameters``,
  ``layer_granularity``, ...; :mod:`evomerge.space.genome`), whose non-MLP tensors (and, for the
  hidden gate modes, hidden states) replace the base model's. Without ``method`` they are the
  base's own, as mergekit-moe does.

Gene names never collide: the MoE's are ``use.<expert>``, ``prompt.<expert>.<j>``, ``gate_mode``,
``experts_per_token``; the merge's are the genome's (``method``, ``layers_00.add.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.moe.space import MoESpace, moe_distributions, trial_moe_config
from evomerge.space import SearchSpace, SpaceError, parse_space
from evomerge.space.load import read_space_text
from evomerge.errors import validation_problems
from merge_engine.moe.config import MoEConfig, parse_moe_config
from merge_engine.recipe import MergeRecipe, expand_vars, parse_recipe

MOE_KEY = "moe"
SHARED_VAR = "SHARED"  # the variable a saved MoE config names the shared merge's folder by
#: what a space without ``method`` puts in its dense part to make it a valid search space; with
#: ``merge_shared`` false its genes are never suggested and nothing is merged
_NO_MERGE = {"method": "linear"}


class MoESearchSpace(SearchSpace):
    """A :class:`SearchSpace` (the eval, budget and shared-weights genes) plus the MoE block."""

    moe: MoESpace
    merge_shared: bool = False  # True: the file named a ``method`` for the shared weights

    def dense(self) -> SearchSpace:
        """The shared-weights part as a plain search space (the genome's input)."""
        return SearchSpace.model_construct(**{k: getattr(self, k) for k in SearchSpace.model_fields})


@dataclass(frozen=True)
class MoERecipe:
    """One MoE candidate: its mergekit-moe config, the merge of its shared weights (None: the
    base's own), and the seed of random routers and expert noise: the
    :class:`~evomerge.proposal.Proposal` of an MoE search (the loop stores :meth:`to_yaml` per
    trial and reads ``seed``, as for a merge recipe)."""

    config: MoEConfig
    shared: MergeRecipe | None
    seed: int

    def moe_yaml(self) -> str:
        """The mergekit-moe config ``evomerge moe`` rebuilds this candidate from; with a shared
        merge, its ``base_model`` is ``${SHARED}`` (the folder that merge was written to)."""
        data = self.config.model_dump(mode="json", exclude_none=True)
        if self.shared is not None:
            data["base_model"] = "${" + SHARED_VAR + "}"
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def to_yaml(self) -> str:
        data: dict[str, Any] = {"moe": self.config.model_dump(mode="json", exclude_none=True), "seed": self.seed}
        if self.shared is not None:
            data["shared"] = yaml.safe_load(self.shared.to_yaml())
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> MoERecipe:
        data = yaml.safe_load(text)
        shared = data.get("shared")
        return cls(parse_moe_config(data["moe"]), None if shared is None else parse_recipe(shared),
                   int(data["seed"]))


def is_moe_space(data: Any) -> bool:
    """Whether parsed YAML is an MoE search space (has a ``moe:`` block)."""
    return isinstance(data, Mapping) and MOE_KEY in data


def parse_moe_space(data: Mapping[str, Any], *, source: str = "search space", base_dir: Path | None = None,
                    variables: Mapping[str, str] | None = None) -> MoESearchSpace:
    """Build an MoE search space from parsed YAML; every problem in one :class:`SpaceError`."""
    data = dict(data)
    block = data.pop(MOE_KEY)
    if not isinstance(block, Mapping):
        raise SpaceError(f"moe: expected a mapping (prompts, gate_modes, ...), got {type(block).__name__}", source)
    merge_shared = "method" in data
    if not merge_shared:
        data.update(_NO_MERGE)
    dense = parse_space(data, source=source, base_dir=base_dir, variables=variables)
    block = dict(expand_vars(dict(block), variables or {}, lambda key: SpaceError(
        f"${{{key}}} is not set; pass it (e.g. --var {key}=...) or edit the space", source)))
    problems = []
    if dense.base_model is None:
        problems.append("base_model: an MoE search needs the base model (it gives the non-expert weights)")
    names = [m.name for m in dense.models]
    prompts, negative = block.pop("prompts", None) or {}, block.pop("negative_prompts", None) or {}
    for key, given in (("prompts", prompts), ("negative_prompts", negative)):
        if not isinstance(given, Mapping):
            problems.append(f"moe.{key}: expected expert name -> list of prompts, got {type(given).__name__}")
        elif unknown := sorted(set(given) - set(names)):
            problems.append(f"moe.{key}: {unknown} are not expert names; use the names of models: {names}")
    for key in ("base_model", "experts"):
        if key in block:
            problems.append(f"moe.{key}: comes from the space's {'base_model' if key == 'base_model' else 'models'}; "
                            "remove it from the moe block")
    if problems:
        raise SpaceError(problems, source)
    block.setdefault("dtype", dense.dtype)
    experts = [{"name": m.name, "model": m.model, "prompts": prompts.get(m.name),
                "negative_prompts": negative.get(m.name)} for m in dense.models]
    try:
        moe = MoESpace.model_validate({**block, "base_model": dense.base_model.model, "experts": experts})
        return MoESearchSpace.model_validate({**dense.model_dump(), "moe": moe, "merge_shared": merge_shared})
    except ValidationError as err:
        raise SpaceError([f"moe.{p}" for p in validation_problems(err)], source) from None


def load_moe_space(path: str | Path, variables: Mapping[str, str] | None = None) -> MoESearchSpace:
    """Read an MoE search space file (``${VAR}`` expanded as for every space)."""
    path = Path(path)
    data = yaml.safe_load(read_space_text(path))
    if not is_moe_space(data):
        raise SpaceError("no moe: block; an MoE search space says how to build its MoEs there", str(path))
    return parse_moe_space(data, source=str(path), base_dir=path.parent.resolve(), variables=variables)


def moe_space_distributions(space: MoESearchSpace) -> dict[str, Any]:
    """Every gene of the space: the MoE build's, then the shared merge's."""
    from evomerge.space import distributions

    return {**moe_distributions(space.moe), **(distributions(space.dense()) if space.merge_shared else {})}


def trial_moe_recipe(space: MoESearchSpace, trial: Any) -> MoERecipe:
    """The MoE candidate ``trial`` proposes (``optuna.TrialPruned`` for an infeasible build)."""
    from evomerge.space import trial_recipe

    import optuna

    try:
        config = trial_moe_config(space.moe, trial)
    except optuna.TrialPruned as why:  # trials.csv's error column says which rule it broke
        trial.set_user_attr("error", f"pruned before building: {why}")
        raise
    shared = trial_recipe(space.dense(), trial) if space.merge_shared else None
    return MoERecipe(config, shared, space.seed)


def default_params(space: MoESearchSpace) -> dict[str, Any]:
    """mergekit-moe's defaults as genes: every expert, every prompt, gate_mode ``hidden`` (when
    searched), 2 experts per token (within the searched range). The shared merge's genes are
    left to the sampler."""
    params: dict[str, Any] = {}
    for name, dist in moe_distributions(space.moe).items():
        if name.startswith(("use.", "prompt.")):
            params[name] = True
        elif name == "gate_mode":
            params[name] = "hidden" if "hidden" in dist.choices else dist.choices[0]
        elif name == "experts_per_token":
            params[name] = min(max(2, dist.low), dist.high)
    return params
