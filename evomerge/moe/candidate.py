"""The resident MoE of a search: each candidate's MoE built in memory and written into it.

    with MoECandidate.load(space, device="cpu") as cand:
        for recipe in recipes:                    # MoERecipe (evomerge.moe.search_space)
            cand.apply(recipe)                    # build in memory; into the resident model in place
            evaluator.evaluate(cand.model, cand.tokenizer)

Lifecycle: :meth:`MoECandidate.load` once (opens the dense base as a
:class:`~evomerge.candidate.Candidate`: the shared weights are merged into it in place, and the
input models are scored with it); :meth:`apply` per candidate; :meth:`close` at the end. A
candidate with the resident model's architecture and expert count is copied into it
(:func:`merge_engine.moe.apply.write_moe_into`); another one gets a model of its own (the old one
is released first). Either way the model equals, bit for bit, the folder ``evomerge moe``
builds from the candidate's saved config (and ``evomerge merge`` from its shared merge).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from evomerge.candidate import Candidate
from evomerge.moe.search_space import MoERecipe, MoESearchSpace
from merge_engine.moe import MoEBuilder, MoEState, load_moe_model
from merge_engine.moe.apply import write_moe_into


@dataclass(frozen=True)
class MoEApplyStats:
    """How one candidate was applied: ``in_place`` (copied into the resident model) or not
    (a new model loaded), and the seconds spent merging the shared weights, building the MoE's
    tensors and putting them into a model."""

    in_place: bool
    merge_s: float
    build_s: float
    load_s: float

    @property
    def seconds(self) -> float:
        return self.merge_s + self.build_s + self.load_s


class MoECandidate:
    """The dense base (shared-weights merges, input scores) and the resident MoE model."""

    def __init__(self, dense: Candidate, builder: MoEBuilder, device: str = "cpu") -> None:
        self.dense = dense
        self.builder = builder
        self.device = device
        self.model: Any = None
        self.tokenizer = dense.tokenizer
        self.built: MoEState | None = None

    @classmethod
    def load(cls, space: MoESearchSpace, *, device: str = "cpu", router_dtype: str = "bfloat16") -> MoECandidate:
        from merge_engine.devices import pick_device
        from merge_engine.io.refs import ModelRef
        from merge_engine.io.resolve import resolve_model_dir

        device = str(pick_device(device))  # "auto" -> the device every part uses
        base = resolve_model_dir(ModelRef.parse(space.moe.base_model))
        dense = Candidate.load(base, dtype=space.dtype, device=device,
                               task_vector_cache_bytes=space.task_vector_cache)
        builder = MoEBuilder(device=device, router_dtype=router_dtype, seed=space.seed)
        return cls(dense, builder, device)

    def apply(self, recipe: MoERecipe) -> MoEApplyStats:
        """Make ``recipe``'s MoE the resident model (RecipeError for a build that cannot be made)."""
        t0 = time.perf_counter()
        base_tensors = None
        if recipe.shared is not None:
            self.dense.apply(recipe.shared)
            base_tensors = self.dense.model.state_dict()
        t1 = time.perf_counter()
        built = self.builder.build(recipe.config, base_tensors=base_tensors)
        t2 = time.perf_counter()
        in_place = self.model is not None and write_moe_into(self.model, built)
        if not in_place:
            self.model = None
            gc.collect()  # the previous MoE goes before the next one is loaded
            self.model = load_moe_model(built, device=self.device)
        self.built = built
        return MoEApplyStats(in_place, t1 - t0, t2 - t1, time.perf_counter() - t2)

    def cache_summary(self) -> str | None:
        """The shared-weights merges' task-vector cache (:meth:`Candidate.cache_summary`)."""
        return self.dense.cache_summary()

    def close(self) -> None:
        self.model = None
        self.builder.close()
        self.dense.close()

    def __enter__(self) -> MoECandidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
