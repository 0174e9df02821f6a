"""Merge a recipe to disk: validate → plan → execute → sharded safetensors, published atomically."""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_engine.chat_templates import output_template
from merge_engine.devices import pick_device
from merge_engine.errors import CheckpointError, MergeError
from merge_engine.graph import Executor
from merge_engine.io import DEFAULT_SHARD_SIZE
from merge_engine.io.memory import FolderFiles, MemoryModel
from merge_engine.io.refs import ModelRef
from merge_engine.io.stream import PlannedTensor
from merge_engine.io.writer import OutputWriter, model_card, tokenizer_files
from merge_engine.plan import MergeContext, MergePlan, output_shape_dtype
from merge_engine.recipe import MergeRecipe
from merge_engine.session import prepare


@dataclass
class MergeResult:
    out_dir: Path | None
    tensors: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    peak_live_tensors: int = 0


def provenance_note(device: torch.device) -> str:
    """The model card's line naming where the merge ran: bits are reproducible per device type."""
    kind = "the CPU" if device.type == "cpu" else "a CUDA GPU"
    return (f"Merged on `{device.type}` (torch {torch.__version__}). The recipe reproduces these bytes "
            f"on {kind}; a merge on another device type may differ in the last bits (reductions "
            "add in another order).\n")


def _write_extras(writer, plan: MergePlan, readers, recipe: MergeRecipe, device: torch.device,
                  recipe_text: str | None = None, inputs: list[str] | None = None) -> None:
    """Everything but the weights: config, tokenizer, chat template, the recipe and a model card
    (``recipe_text``/``inputs``: what the card shows, by default ``recipe``'s own)."""
    from merge_engine.io.resolve import resolve_model_dir

    writer.write_json("config.json", plan.config)
    tok_dir = resolve_model_dir(recipe.tokenizer_model())
    with tempfile.TemporaryDirectory() as tmp:
        if plan.vocabulary is not None:  # the built tokenizer; generation_config.json from its model
            writer.copy_files(tmp, plan.vocabulary.save(Path(tmp)))
            writer.copy_files(tok_dir, [n for n in tokenizer_files(tok_dir) if n == "generation_config.json"])
            tok_config = Path(tmp) / "tokenizer_config.json"
        else:
            writer.copy_files(tok_dir, tokenizer_files(tok_dir))
            tok_config = tok_dir / "tokenizer_config.json"
        template = output_template(recipe.chat_template, recipe.referenced_models(), resolve_model_dir)
        if template is not None:
            # transformers reads chat_template.jinja first; a template kept inside
            # tokenizer_config.json (older transformers read only that one) is replaced too
            writer.write_text("chat_template.jinja", template)
            if tok_config.is_file():
                try:
                    settings = json.loads(tok_config.read_text(encoding="utf-8"))
                except ValueError:
                    raise CheckpointError(f"{tok_config} is not valid JSON; repair the tokenizer source") from None
                if isinstance(settings, dict) and "chat_template" in settings:
                    writer.write_json("tokenizer_config.json", {**settings, "chat_template": template})
    text = recipe_text if recipe_text is not None else recipe.to_yaml()
    writer.write_text("evomerge_recipe.yaml", text)
    if inputs is None:
        inputs = [str(r) for r in recipe.referenced_models()]
    card = model_card(text, inputs, recipe.merge_method)
    writer.write_text("README.md", f"{card}\n## Provenance\n\n{provenance_note(device)}")


def run_merge(recipe: MergeRecipe, out_dir: str | Path, *, device: str | None = "auto",
              shard_size: int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
              trust_remote_code: bool = False, force: bool = False, dry_run: bool = False,
              prefetch: int | None = None, progress: Callable[[int, int], None] | None = None,
              opened: dict[ModelRef, Any] | None = None, recipe_text: str | None = None,
              inputs: list[str] | None = None, lora_merge_dtype: str | None = None) -> MergeResult:
    """Merge ``recipe`` into ``out_dir``.

    Output goes to a temporary sibling directory that is renamed into place at
    the end, so an interrupted or failed merge leaves nothing at ``out_dir``. ``device``
    (``auto``/``cpu``/``cuda:N``) is resolved once by :func:`merge_engine.devices.pick_device`
    and named in the model card: bytes are identical for merges on one device type.
    ``opened`` supplies readers for some models (as :func:`merge_engine.session.prepare` takes
    them); ``recipe_text`` and ``inputs``
    replace the recipe and input list the output's ``evomerge_recipe.yaml`` and card show;
    ``lora_merge_dtype`` as :func:`merge_engine.session.prepare` takes it.
    """
    start = time.perf_counter()
    with ExitStack() as stack:
        plan, readers = prepare(recipe, stack, opened=opened, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, lora_merge_dtype=lora_merge_dtype)
        if dry_run:
            return MergeResult(None, len(plan.targets), time.perf_counter() - start, plan.warnings)
        peak = write_planned(plan, readers, recipe, out_dir, device=pick_device(device), shard_size=shard_size,
                             force=force, prefetch=prefetch, progress=progress, recipe_text=recipe_text,
                             inputs=inputs)
        return MergeResult(Path(out_dir), len(plan.targets), time.perf_counter() - start, plan.warnings, peak)


def write_planned(plan: MergePlan, readers, recipe: MergeRecipe, out_dir: str | Path, *, device: torch.device,
                  shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, prefetch: int | None = None,
                  progress: Callable[[int, int], None] | None = None, recipe_text: str | None = None,
                  inputs: list[str] | None = None) -> int:
    """Execute a prepared ``plan`` into ``out_dir`` (atomically, as :func:`run_merge`); the
    executor's peak of live tensors."""
    with OutputWriter(out_dir, shard_size=shard_size, force=force) as writer:
        writer.plan([PlannedTensor(n.out_name, *output_shape_dtype(n, readers)) for n in plan.targets])
        peak = _execute(plan, readers, device, prefetch, writer.add, progress)
        _write_extras(writer, plan, readers, recipe, device, recipe_text, inputs)
        writer.publish()
    return peak


def planned_bytes(plan: MergePlan, readers) -> int:
    """Bytes of every output tensor of ``plan``."""
    total = 0
    for node in plan.targets:
        shape, dtype = output_shape_dtype(node, readers)
        total += math.prod(shape) * dtype.itemsize
    return total


def keep_planned(plan: MergePlan, readers, recipe: MergeRecipe, name: str, files_dir: str | Path, *,
                 device: torch.device, prefetch: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> MemoryModel:
    """Execute a prepared ``plan`` into memory: the tensors :func:`write_planned` would write
    (same bytes, on the CPU) in a :class:`MemoryModel` called ``name``; everything else a merge
    writes (config, tokenizer, chat template, recipe, card) goes into the existing folder
    ``files_dir``, which becomes the model's ``model_dir``."""
    planned = {n.out_name: output_shape_dtype(n, readers) for n in plan.targets}
    tensors: dict[str, torch.Tensor] = {}

    def keep(out_name: str, tensor: torch.Tensor) -> None:
        shape, dtype = planned[out_name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise MergeError(f"tensor {out_name} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{tuple(shape)} {dtype}; this is a bug in the planner")
        tensors[out_name] = tensor.detach().to("cpu").contiguous()

    _execute(plan, readers, device, prefetch, keep, progress)
    _write_extras(FolderFiles(files_dir), plan, readers, recipe, device)
    return MemoryModel(name, files_dir, plan.config, tensors)


def planned_model(plan: MergePlan, readers, recipe: MergeRecipe, name: str, files_dir: str | Path) -> MemoryModel:
    """What :func:`keep_planned` would return, known by the plan alone (no tensor computed): a
    :class:`MemoryModel` without data, enough to validate and plan the stages that read it.
    Its files are written as a merge writes them; where a tokenizer is not at hand (a model
    known by its config alone), ``config.json`` alone."""
    files = FolderFiles(files_dir)
    try:
        _write_extras(files, plan, readers, recipe, torch.device("cpu"))
    except MergeError:
        files.write_json("config.json", plan.config)
    planned = {n.out_name: output_shape_dtype(n, readers) for n in plan.targets}
    return MemoryModel(name, files_dir, plan.config, shapes=planned)


def _execute(plan: MergePlan, readers, device: torch.device, prefetch: int | None,
             sink: Callable[[str, torch.Tensor], None], progress: Callable[[int, int], None] | None) -> int:
    """Run ``plan``, handing each output tensor (on the CPU) to ``sink``; the executor's peak.

    The objects alive before the run (torch, transformers, the plan) are frozen out of the garbage
    collector's scans while it runs: the per-tensor calls allocate enough small objects to trigger
    full collections that would walk them all, about 5 % of a sparsifying merge's time."""
    executor = Executor(plan.targets, MergeContext(readers, device), prefetch=prefetch)
    total = len(plan.targets)
    gc.freeze()
    try:
        for i, (node, tensor) in enumerate(executor.run(), 1):
            sink(node.out_name, tensor.cpu())
            if progress is not None:
                progress(i, total)
    finally:
        gc.unfreeze()
    return executor.peak_live


def plan_summary(plan: MergePlan) -> str:
    """A short human summary of a plan (for --dry-run)."""
    methods = {t.method for t in plan.targets}
    return json.dumps({"tensors": len(plan.targets), "layers": plan.num_layers,
                       "methods": sorted(methods), "reference": str(plan.reference)})
