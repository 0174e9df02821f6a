"""Run multi-stage recipes: intermediate stages in memory when they fit, only the final one written.

:class:`StagePipeline` owns the outputs of a recipe's stages (:mod:`merge_engine.stages` reads
the file). A stage's output is held in memory as a :class:`~merge_engine.io.memory.MemoryModel`
while the held outputs fit ``memory_budget`` bytes, else written as a normal model folder into
the pipeline's work folder; with ``keep_dir`` every named stage is written to ``keep_dir/NAME``
(as mergekit-multi's ``--intermediate-dir``) and read from there; a folder already holding that
stage's merge of the same recipe is reused (:mod:`merge_engine.kept_stages`). Later stages read an output
exactly as they would read that folder from disk, so results are bit-identical to merging the
stages one by one through disk (weights, config and tokenizer files; the recipe and card differ
only in naming the stages instead of folders). A stage reading ``NAME+adapter`` reads the held
output with the adapter applied (:class:`~merge_engine.io.lora.LoraReader`), and every adapter,
on a stage or on a model, is merged in ``lora_merge_dtype`` when given (mergekit's option,
applied to every stage as mergekit-multi applies its merge options).

Two uses:

- :func:`run_stages` merges a whole file into one output folder (``evomerge merge``), releasing
  each intermediate once the last stage reading it has run, and removing the work folder.
- A search keeps a pipeline open: :meth:`StagePipeline.materialize` computes fixed stages once,
  :meth:`~StagePipeline.bind` points a searched recipe's stage names at their outputs and
  :meth:`~StagePipeline.readers` hands those outputs to ``prepare(opened=...)``; or
  :meth:`~StagePipeline.run` swaps in searched recipes for some stages and recomputes only them
  and the stages downstream of them, returning the final output in memory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from merge_engine.devices import pick_device
from merge_engine.errors import RecipeError
from merge_engine.io import DEFAULT_SHARD_SIZE
from merge_engine.io.memory import MemoryModel
from merge_engine.io.refs import ModelRef
from merge_engine.kept_stages import check_kept, kept_recipe_text, stage_digest, stage_key
from merge_engine.merge import MergeResult, keep_planned, planned_bytes, write_planned
from merge_engine.recipe import MergeRecipe
from merge_engine.stage_validate import compare_held, validate_stages
from merge_engine.stages import Stage, bind, needed_stages, stage_refs, stages_yaml, with_overrides

Progress = Callable[[str, int, int], None]  # (stage label, tensors done, tensors in the stage)


def default_memory_budget() -> int:
    """Half the memory available now (Linux ``MemAvailable``; 8 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30


class StagePipeline:
    """The outputs of ``stages`` (run order, final last, as :func:`~merge_engine.stages.load_stages`
    returns them), computed on demand and kept until :meth:`close`.

    ``work_parent`` is where the hidden work folder goes (files of in-memory outputs: config
    and tokenizer, a few MB; outputs over the budget); the folder is removed by :meth:`close`,
    so a MemoryModel returned by :meth:`run` must be used before then. Not thread-safe.
    """

    def __init__(self, stages: Sequence[Stage], *, work_parent: str | Path | None = None,
                 device: str | None = "auto", memory_budget: int | None = None,
                 keep_dir: str | Path | None = None, force: bool = False,
                 shard_size: int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
                 trust_remote_code: bool = False, prefetch: int | None = None,
                 progress: Progress | None = None, lora_merge_dtype: str | None = None) -> None:
        self.stages = list(stages)
        self.lora_merge_dtype = lora_merge_dtype
        self.device = pick_device(device)
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.keep_dir = Path(keep_dir).expanduser().absolute() if keep_dir is not None else None
        self.force = force
        self.shard_size = shard_size
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.prefetch = prefetch
        self.progress = progress
        parent = Path(work_parent).expanduser().absolute() if work_parent is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=".evomerge-stages-", dir=parent))
        self._outputs: dict[str, tuple[str, Path, MemoryModel | None]] = {}  # name -> (key, folder, held)
        self._adapted: dict[ModelRef, Any] = {}  # held output + adapter -> its LoraReader
        self._reusable: set[str] = set()  # kept stages found complete and current (write_final)
        self._count = 0
        self.computed: list[str] = []  # stage names in the order they were merged (for callers and tests)
        self.reused: list[str] = []  # kept stages read from their folders instead of merged

    # -- the search API ----------------------------------------------------------------------

    def materialize(self, names: Sequence[str] | None = None) -> dict[str, ModelRef]:
        """Compute stages ``names`` (default: every stage but the final) and those they read,
        unless already computed from the same recipes; returns :meth:`refs`."""
        by_name = {s.name: s for s in self.stages}
        wanted = [s.name for s in self.stages[:-1]] if names is None else list(names)
        for name in wanted:
            if name not in by_name or name is None:
                raise RecipeError(f"no stage named {name!r}; stages are "
                                  f"{', '.join(str(s.name) for s in self.stages)}")
        needed = needed_stages(self.stages, wanted)
        for stage in self.stages:
            if stage.name in needed:
                self._ensure(stage, self.stages)
        return self.refs()

    def refs(self) -> dict[str, ModelRef]:
        """Where each computed stage's output is, as the model reference bound recipes use."""
        return {name: ModelRef(str(folder)) for name, (_, folder, _) in self._outputs.items()}

    def bind(self, recipe: MergeRecipe) -> MergeRecipe:
        """``recipe`` with references to computed stages (by name) pointing at their outputs."""
        return bind(recipe, self.refs())

    def readers(self, recipe: MergeRecipe | None = None) -> dict[ModelRef, Any]:
        """The in-memory outputs a bound recipe reads, as ``prepare(opened=...)`` takes them: a
        held output, or for ``output+adapter`` a LoraReader over it (opened at the first request,
        kept until the output is dropped). Default: every held output and every adapter reader
        opened so far. Outputs on disk are left to the normal path."""
        held = {ModelRef(str(folder)): model for _, folder, model in self._outputs.values()
                if model is not None}
        if recipe is None:
            return {**held, **self._adapted}
        out: dict[ModelRef, Any] = {}
        for ref in stage_refs(recipe):
            model = held.get(ModelRef(ref.path))
            if model is not None and ref not in out:
                out[ref] = self._adapter(ref, model) if ref.lora else model
        return out

    def run(self, overrides: Mapping[str | None, MergeRecipe] | None = None) -> tuple[MemoryModel, MergeResult]:
        """The final stage's output in memory, with ``overrides`` (stage name -> recipe; the
        unnamed final stage is ``None``) replacing those stages' recipes. Stages whose recipes
        and inputs are unchanged since they were last computed are reused; the others are
        recomputed (the old output of a stage is dropped when it is recomputed)."""
        stages = with_overrides(self.stages, overrides or {})
        *upstream, final = stages
        needed = needed_stages(stages, final.needs)
        for stage in upstream:
            if stage.name in needed:
                self._ensure(stage, stages)
        with ExitStack() as stack:
            recipe, opened = self._bound(final)
            plan, readers = self._prepare(final, recipe, opened, stack)
            folder = self._folder(final.name or "final")
            start = time.perf_counter()
            model = keep_planned(plan, readers, recipe, final.name or "final", folder, device=self.device,
                                 prefetch=self.prefetch, progress=self._stage_progress(final))
            self.computed.append(str(final.name))
            return model, MergeResult(None, len(plan.targets), time.perf_counter() - start, plan.warnings)

    # -- one command: the whole file to a folder -----------------------------------------------

    def write_final(self, out_dir: str | Path, *, recipe_text: str | None = None) -> MergeResult:
        """Compute every stage, writing the final one to ``out_dir`` (atomically, refusing an
        existing folder unless ``force``); each intermediate is released after its last reader."""
        start = time.perf_counter()
        *upstream, final = self.stages
        if self.keep_dir is not None:  # refused before any stage runs
            self._reusable = check_kept(self.keep_dir, upstream, self.lora_merge_dtype, self.force)
        last_use = {}
        for i, stage in enumerate(self.stages):
            for need in stage.needs:
                last_use[need] = i
        warnings: list[str] = []
        for i, stage in enumerate(upstream):
            self._ensure(stage, self.stages, warnings)
            self._release_done(last_use, i)
        with ExitStack() as stack:
            recipe, opened = self._bound(final)
            plan, readers = self._prepare(final, recipe, opened, stack)
            warnings.extend(f"{final.label}: {w}" for w in plan.warnings)
            inputs = sorted({str(r) for s in self.stages for r in stage_refs(s.recipe)
                             if r.path not in {t.name for t in self.stages}})
            peak = write_planned(plan, readers, recipe, out_dir, device=self.device, shard_size=self.shard_size,
                                 force=self.force, prefetch=self.prefetch, progress=self._stage_progress(final),
                                 recipe_text=recipe_text or stages_yaml(self.stages), inputs=inputs)
            self.computed.append(str(final.name))
            return MergeResult(Path(out_dir), len(plan.targets), time.perf_counter() - start, warnings, peak)

    def close(self) -> None:
        """Drop every held output and remove the work folder (kept intermediates stay)."""
        for name in list(self._outputs):
            self._drop(name)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> StagePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _ensure(self, stage: Stage, stages: Sequence[Stage], warnings: list[str] | None = None) -> None:
        """Compute ``stage`` (its inputs are already computed) unless its output is current
        (held, or a kept folder :meth:`write_final` found reusable)."""
        key = stage_key(stage, stages)
        old = self._outputs.get(stage.name)
        if old is not None and old[0] == key:
            return
        if self.keep_dir is not None and stage.name in self._reusable:
            self._drop(stage.name)
            self._outputs[stage.name] = (key, self.keep_dir / stage.name, None)
            self.reused.append(stage.name)
            return
        with ExitStack() as stack:
            recipe, opened = self._bound(stage)
            plan, readers = self._prepare(stage, recipe, opened, stack)
            if warnings is not None:
                warnings.extend(f"{stage.label}: {w}" for w in plan.warnings)
            progress = self._stage_progress(stage)
            if self.keep_dir is not None:
                folder = self.keep_dir / stage.name
                text = kept_recipe_text(stage.name, stage_digest(stage, stages, self.lora_merge_dtype),
                                        recipe.to_yaml())
                write_planned(plan, readers, recipe, folder, device=self.device, shard_size=self.shard_size,
                              force=self.force, prefetch=self.prefetch, progress=progress, recipe_text=text)
                model = None
            elif planned_bytes(plan, readers) + self._held_bytes(except_name=stage.name) <= self.memory_budget:
                folder = self._folder(stage.name)
                model = keep_planned(plan, readers, recipe, stage.name, folder, device=self.device,
                                     prefetch=self.prefetch, progress=progress)
            else:
                folder = self._folder(stage.name, create=False)
                write_planned(plan, readers, recipe, folder, device=self.device, shard_size=self.shard_size,
                              prefetch=self.prefetch, progress=progress)
                model = None
        self._drop(stage.name)
        self._outputs[stage.name] = (key, folder, model)
        self.computed.append(stage.name)

    def _bound(self, stage: Stage) -> tuple[MergeRecipe, dict[ModelRef, Any]]:
        """``stage``'s recipe pointing at its inputs' outputs, and readers for those in memory."""
        recipe = self.bind(stage.recipe)
        return recipe, self.readers(recipe)

    def _adapter(self, ref: ModelRef, model: MemoryModel) -> Any:
        """The LoraReader of held output ``model`` with ``ref``'s adapter (opened once per output)."""
        from merge_engine.dtypes import torch_dtype
        from merge_engine.io.lora import LoraReader
        from merge_engine.io.resolve import resolve_adapter_dir

        if ref not in self._adapted:
            adapter = resolve_adapter_dir(ref, allow_pickle=self.allow_pickle)
            dtype = torch_dtype(self.lora_merge_dtype) if self.lora_merge_dtype else None
            self._adapted[ref] = LoraReader(model, adapter, name=f"{model.name}+{ref.lora}",
                                            allow_pickle=self.allow_pickle, merge_dtype=dtype)
        return self._adapted[ref]

    def _prepare(self, stage: Stage, recipe: MergeRecipe, opened: dict[ModelRef, Any], stack: ExitStack):
        """:func:`merge_engine.session.prepare` for one stage, problems named by stage."""
        from merge_engine.session import prepare

        problems = compare_held(recipe, opened)
        if problems:
            raise RecipeError([f"{stage.label}: {p}" for p in problems])
        try:
            return prepare(recipe, stack, opened=dict(opened), allow_pickle=self.allow_pickle,
                           trust_remote_code=self.trust_remote_code, lora_merge_dtype=self.lora_merge_dtype)
        except RecipeError as err:
            raise RecipeError([f"{stage.label}: {p}" for p in err.problems]) from None

    def _folder(self, name: str, create: bool = True) -> Path:
        self._count += 1
        folder = self.work / f"{name}-{self._count}"
        if create:
            folder.mkdir()
        return folder

    def _held_bytes(self, except_name: str | None = None) -> int:
        return sum(m.total_bytes() for n, (_, _, m) in self._outputs.items()
                   if m is not None and m.has_data and n != except_name)

    def _drop(self, name: str) -> None:
        """Forget ``name``'s output: release its tensors, remove its folder unless kept."""
        old = self._outputs.pop(name, None)
        if old is None:
            return
        _, folder, model = old
        for ref in [r for r in self._adapted if r.path == str(folder)]:
            self._adapted.pop(ref).close()  # the adapter's files; the output is released below
        if model is not None:
            model.release()
        if self.work in folder.parents:
            shutil.rmtree(folder, ignore_errors=True)

    def _release_done(self, last_use: Mapping[str, int], i: int) -> None:
        """Drop the outputs no stage after stage ``i`` reads."""
        for name in [n for n, last in last_use.items() if last <= i and n in self._outputs]:
            self._drop(name)

    def _stage_progress(self, stage: Stage) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        label = stage.name or "final"
        return lambda done, total: self.progress(label, done, total)


def run_stages(stages: Sequence[Stage], out_dir: str | Path, *, device: str | None = "auto",
               memory_budget: int | None = None, keep_dir: str | Path | None = None,
               force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
               trust_remote_code: bool = False, prefetch: int | None = None,
               progress: Progress | None = None, lora_merge_dtype: str | None = None) -> MergeResult:
    """Merge every stage, writing only the final one to ``out_dir`` (atomically, as
    :func:`merge_engine.merge.run_merge`); intermediates live in memory within ``memory_budget``
    bytes (default :func:`default_memory_budget`), else in a hidden folder beside ``out_dir`` that
    is removed at the end, or in ``keep_dir/NAME`` when given (kept; a folder there already
    holding that stage's merge of the same recipe is reused, any other is refused unless
    ``force``). A stage that no later stage reads and that is not the final one is merged only
    when ``keep_dir`` is given. ``lora_merge_dtype`` applies to the adapters of every stage."""
    out_dir = Path(out_dir).expanduser().absolute()
    unused = [s.name for s in stages[:-1] if not any(s.name in t.needs for t in stages)]
    if unused and keep_dir is None:
        raise RecipeError(f"stage {unused[0]} is read by no other stage and is not the final one; "
                          "reference it, remove it, or keep intermediates (--intermediate-dir DIR)")
    if out_dir.exists() and not force:  # before any stage runs, not after the last one
        from merge_engine.errors import OutputExistsError
        raise OutputExistsError(f"output directory {out_dir} exists; pass --force to replace it")
    # every stage planned against the plans of those it reads: a problem in a late stage is
    # reported before the early ones spend their merge time
    report = validate_stages(stages, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             lora_merge_dtype=lora_merge_dtype)
    if report.problems:
        raise RecipeError(report.problems)
    with StagePipeline(stages, work_parent=out_dir.parent, device=device, memory_budget=memory_budget,
                       keep_dir=keep_dir, force=force, shard_size=shard_size, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, prefetch=prefetch, progress=progress,
                       lora_merge_dtype=lora_merge_dtype) as pipe:
        return pipe.write_final(out_dir)
