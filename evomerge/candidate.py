"""The candidate: one resident model that each merge recipe is written into, in place.

Both the search (one candidate per trial) and the ablation grids (one per table row) hold one
model in memory and turn it into each merge without writing to disk:

    with Candidate.load(model_dir, dtype="bfloat16", device="cpu") as cand:
        for recipe in recipes:
            cand.apply(recipe)                     # only tensors whose recipe changed are rewritten
            evaluator.evaluate(cand.model, cand.tokenizer)

A candidate may also be a multi-stage recipe (:class:`~evomerge.proposal.MultiStageRecipe`, or
any sequence of :class:`~merge_engine.stages.Stage`, final last, e.g. fixed stages around a
searched one): the stages before the final one are computed in memory by one
:class:`~merge_engine.multistage.StagePipeline` kept for the candidate's life (each only when its
recipe or inputs changed since it was last computed), and the final stage is written into the
resident model reading those outputs from memory.

Lifecycle: :meth:`Candidate.load` once (reads the model and tokenizer from a local directory onto
the device the evaluation's memory plan names, :func:`evomerge.devices.placement`); :meth:`apply`
once per candidate; :meth:`close` at the end (also via ``with``). The applied model equals, bit
for bit, the on-disk merge of the same recipe merged on the same device type and loaded in the
same dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.devices import hf_load_kwargs, placement
from evomerge.layer_stack import LayerStack
from evomerge.offload import OffloadError, offloaded, writable_targets
from merge_engine.apply import DEFAULT_TASK_VECTOR_CACHE_BYTES, ApplyStats, InMemoryMerger
from merge_engine.recipe import MergeRecipe

if TYPE_CHECKING:
    from evomerge.evaluate.tasks.config import EvalConfig
    from merge_engine.multistage import StagePipeline
    from merge_engine.stages import Stage


def load_causal_lm(path: str | Path, *, dtype: str = "auto", device: str = "cpu",
                   **load_kwargs: Any) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory, on ``device``, in eval
    mode. ``dtype`` is a torch dtype name or ``auto`` (the config's). ``load_kwargs`` go to
    ``from_pretrained`` (:func:`evomerge.devices.hf_load_kwargs`); with a ``device_map`` the
    model is placed by it, not moved to ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_engine.dtypes import torch_dtype as dtype_of

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a saved model")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype == "auto" else dtype_of(dtype), **load_kwargs)
    if "device_map" not in load_kwargs:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class Candidate:
    """A resident model and the in-place merger that writes each candidate recipe into it.

    ``cache_sources`` keeps every source tensor read (a search re-merges the same models many
    times); an ablation grid of a few 7B recipes turns it off to stay within RAM.
    ``task_vector_cache_bytes`` caps the merger's per-run cache of task vectors (0: off).
    ``lora_merge_dtype`` (mergekit's option, ``evomerge merge --lora-merge-dtype``) is the dtype
    every ``base+adapter`` (and ``stage+adapter``) model is merged in: the same bits as a merge
    to disk with that option.
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu", cache_sources: bool = True,
                 allow_pickle: bool = False,
                 task_vector_cache_bytes: int = DEFAULT_TASK_VECTOR_CACHE_BYTES,
                 lora_merge_dtype: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.allow_pickle = allow_pickle
        self.lora_merge_dtype = lora_merge_dtype
        self.merger = InMemoryMerger(model, device=device, cache_sources=cache_sources,
                                     allow_pickle=allow_pickle, lora_merge_dtype=lora_merge_dtype,
                                     task_vector_cache_bytes=task_vector_cache_bytes,
                                     targets=writable_targets(model))  # accelerate-offloaded: its CPU store
        self.stack: LayerStack | None = None  # built at the first recipe with slices
        self.pipeline: StagePipeline | None = None  # built at the first multi-stage candidate

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "auto", device: str = "cpu",
             cache_sources: bool = True, allow_pickle: bool = False,
             eval_cfg: EvalConfig | None = None,
             task_vector_cache_bytes: int = DEFAULT_TASK_VECTOR_CACHE_BYTES,
             lora_merge_dtype: str | None = None) -> Candidate:
        """Load the model in ``model_dir`` (a local directory) as the resident model, where the
        memory plan of ``eval_cfg``'s backend on ``device`` puts it (None: on ``device``)."""
        where = placement(eval_cfg, device)
        extra = hf_load_kwargs(eval_cfg, device) if where.device_map else {}  # with max_memory
        model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=where.model_device, **extra)
        return cls(model, tokenizer, device=where.merge_device, cache_sources=cache_sources,
                   allow_pickle=allow_pickle, task_vector_cache_bytes=task_vector_cache_bytes,
                   lora_merge_dtype=lora_merge_dtype)

    def cache_summary(self) -> str | None:
        """One line on the merger's per-run task-vector cache (the space's ``task_vector_cache``):
        what it holds per source model against its cap; None when it is off or was never used."""
        report = self.merger.cache_report()
        if not report["cap_bytes"] or not report["hits"] + report["misses"]:
            return None
        mib = 1 << 20
        per_model = ", ".join(f"{b / mib:.0f}" for _, b in sorted(report["bytes_by_model"].items()))
        line = (f"task-vector cache: {report['bytes'] / mib:.0f} MiB of {report['cap_bytes'] / mib:.0f} MiB "
                f"(per source model: {per_model or '0'} MiB)")
        if report["refused"]:
            line += (f"; {report['refused']} tensors past the cap were recomputed per candidate "
                     "(raise task_vector_cache to keep them)")
        return line

    def apply(self, recipe: MergeRecipe | Sequence[Stage]) -> ApplyStats:
        """Write ``recipe``'s merge into the resident model (a recipe, or stages in run order
        with the final one last: see the module docstring).

        The engine checks every merged tensor before writing it and raises NonFiniteError naming
        the tensor (the resident model then keeps that tensor's previous values).

        A recipe of another depth (``slices``, e.g. a layer path) first grows or shrinks the
        model's layer list and config to its layer count (:class:`~evomerge.layer_stack.LayerStack`).
        """
        readers = None
        if not isinstance(recipe, MergeRecipe):
            recipe, readers = self._final_stage(list(recipe))
        if recipe.slices is not None and self.stack is None:
            if offloaded(self.model):
                raise OffloadError("a recipe that changes the layer count cannot run on a model "
                                   "accelerate offloaded; give the GPUs room for the whole model")
            self.stack = LayerStack(self.model)
        if self.stack is not None and self.stack.resize(recipe):
            # the merger writes into the parameters it knows by name: tell it the new ones
            self.merger.targets = dict(self.model.state_dict(keep_vars=True))
        return self.merger.apply(recipe, readers)

    def _final_stage(self, stages: list[Stage]) -> tuple[MergeRecipe, dict | None]:
        """The final stage's recipe bound to the in-memory outputs of the stages it reads (each
        computed now unless current), and the readers of every held output."""
        from merge_engine.multistage import StagePipeline

        *upstream, final = stages
        if not upstream:
            return final.recipe, None
        if self.pipeline is None:
            self.pipeline = StagePipeline(upstream, device=self.device, allow_pickle=self.allow_pickle,
                                          lora_merge_dtype=self.lora_merge_dtype)
        self.pipeline.stages = stages  # outputs are keyed by recipe: unchanged stages are reused
        if final.needs:
            self.pipeline.materialize(list(final.needs))
        bound = self.pipeline.bind(final.recipe)
        # every held output (a later candidate may read it again), and adapters on them this one reads
        return bound, {**self.pipeline.readers(), **self.pipeline.readers(bound)}

    def close(self) -> None:
        """Release the merger's readers and cached source tensors, and held stage outputs."""
        self.merger.close()
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
