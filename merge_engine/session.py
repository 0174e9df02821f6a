"""The one way from a recipe to a plan: check recipe -> open readers -> check models -> plan.

Merging to disk (:func:`merge_engine.merge.run_merge`), applying in memory
(:class:`merge_engine.apply.InMemoryMerger`), ``evomerge validate`` and validating against
bundled configs all go through here, so every caller finds the same problems, all at once:
:func:`prepare` raises them as one RecipeError, :func:`validate` returns them in a Report.

Readers come from three places, in this order: ``opened`` (readers the caller keeps across
calls), ``model_configs`` (a :class:`ConfigOnlyReader` built from a bundled ``config.json``),
else the model's own files (a :class:`CheckpointReader`, entered into the caller's stack).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from merge_engine.dtypes import DTYPE_NAMES
from merge_engine.errors import MergeError, RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.plan import MergePlan
from merge_engine.recipe import MergeRecipe, load_recipe
from merge_engine.validate import Report, check_recipe

Readers = MutableMapping[ModelRef, Any]


class Prepared(NamedTuple):
    """A checked recipe's plan and the readers it reads from (owned by the caller's stack)."""

    plan: MergePlan
    readers: dict[ModelRef, Any]


def prepare(recipe: MergeRecipe, stack: ExitStack, *, opened: Readers | None = None,
            model_configs: Mapping[str, str | Path] | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False, lora_merge_dtype: str | None = None) -> Prepared:
    """Check ``recipe`` and its models and plan it; raises RecipeError listing every problem.

    ``recipe`` is already schema-valid (a MergeRecipe); each check runs once. Readers this call
    opens are entered into ``stack``. ``opened`` is the caller's cache of open readers across
    calls (a search applies thousands of recipes over the same models): its readers are reused,
    and the ones this call opens join it once the recipe has passed. Models are compared with
    each other (architecture, per-layer tensors, shapes) unless every one came from ``opened``:
    those passed that comparison when they joined. ``lora_merge_dtype`` (mergekit's option of
    that name) is the dtype every tensor of a ``base+adapter`` model takes, the adapter merged in
    it (see :class:`merge_engine.io.lora.LoraReader`); None keeps the base's dtypes.
    """
    if lora_merge_dtype is not None and lora_merge_dtype not in DTYPE_NAMES:
        raise RecipeError([f"lora_merge_dtype {lora_merge_dtype!r} is not one of {', '.join(DTYPE_NAMES)}; "
                           "name one of those"])
    report = Report()
    readers, plan = _run(recipe, stack, report, opened=opened, model_configs=model_configs,
                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, compare_cached=False,
                         lora_merge_dtype=lora_merge_dtype)
    if plan is None:
        raise RecipeError(report.problems)
    if opened is not None:
        opened.update(readers)
    return Prepared(plan, readers)


def validate(recipe: MergeRecipe | str | Path, *, with_models: bool = True, opened: Readers | None = None,
             model_configs: Mapping[str, str | Path] | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, variables: Mapping[str, str] | None = None) -> Report:
    """Everything that can be checked before a merge runs (``recipe`` may be a YAML path), all at once.

    ``with_models=False`` stops after the checks that need no model files. With
    ``model_configs`` (``{"org/name": DIR}``, DIR holding the model's ``config.json``), those
    models are checked from their configs alone (no weights) and every other model must be a
    local directory. ``opened`` caches readers across calls: config-only readers built here
    join it (they hold no files; building a 7B architecture takes seconds); readers of model
    files are closed before returning. ``variables`` fill a recipe file's ``${NAME}``s.
    """
    report = Report()
    if not isinstance(recipe, MergeRecipe):
        try:
            recipe = load_recipe(recipe, variables)
        except RecipeError as err:
            report.problems.extend(err.problems)
            return report
    if not with_models:
        check_recipe(recipe, report)
        return report
    with ExitStack() as stack:
        readers, _ = _run(recipe, stack, report, opened=opened, model_configs=model_configs,
                          allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, compare_cached=True)
        if opened is not None:
            from merge_engine.io.config_only import ConfigOnlyReader

            opened.update({r: v for r, v in readers.items() if isinstance(v, ConfigOnlyReader)})
    return report


def _run(recipe: MergeRecipe, stack: ExitStack, report: Report, *, opened: Readers | None,
         model_configs: Mapping[str, str | Path] | None, allow_pickle: bool, trust_remote_code: bool,
         compare_cached: bool, lora_merge_dtype: str | None = None) -> tuple[dict[ModelRef, Any], MergePlan | None]:
    """The pipeline: the readers it opened or reused, and the plan (None when ``report`` has problems)."""
    from merge_engine.layout import check_compatible
    from merge_engine.plan import build_plan

    check_recipe(recipe, report)
    if report.problems:
        return {}, None
    cached = opened if opened is not None else {}
    readers = _open_readers(recipe, stack, report, cached, model_configs, allow_pickle, trust_remote_code,
                            lora_merge_dtype)
    if report.problems:
        return readers, None
    if compare_cached or any(ref not in cached for ref in readers):
        for text in check_compatible({str(ref): r for ref, r in readers.items()}):
            report.add(text)
        if report.problems:
            return readers, None
    try:
        plan = build_plan(recipe, readers)
    except RecipeError as err:
        for text in err.problems:
            report.add(text)
        return readers, None
    report.warnings.extend(plan.warnings)
    return readers, plan


def _open_readers(recipe: MergeRecipe, stack: ExitStack, report: Report, cached: Mapping[ModelRef, Any],
                  model_configs: Mapping[str, str | Path] | None, allow_pickle: bool,
                  trust_remote_code: bool, lora_merge_dtype: str | None = None) -> dict[ModelRef, Any]:
    """A reader for every model the recipe references; what cannot be opened goes to ``report``.

    A ``base+adapter`` ref reads its base with the LoRA adapter applied (a LoraReader)."""
    from merge_engine.io.resolve import resolve_model_dir

    readers: dict[ModelRef, Any] = {}
    referenced = recipe.referenced_models()
    for ref in referenced:
        try:
            if ref in cached:
                readers[ref] = cached[ref]
            elif model_configs is not None:
                readers[ref] = _config_or_local(ref, stack, model_configs, allow_pickle, trust_remote_code)
            else:
                readers[ref] = _model(ref, stack, allow_pickle, trust_remote_code, lora_merge_dtype)
        except MergeError as err:
            report.add(str(err))
    tok = recipe.tokenizer_model()
    known = tok in referenced or (model_configs is not None and isinstance(tok, ModelRef)
                               and tok.path in model_configs)
    if isinstance(tok, ModelRef) and not known:  # a model of the recipe was opened (or reported) above
        try:
            resolve_model_dir(tok)
        except MergeError as err:
            report.add(f"tokenizer source: {err}")
    return readers


def _config_or_local(ref: ModelRef, stack: ExitStack, model_configs: Mapping[str, str | Path],
                     allow_pickle: bool, trust_remote_code: bool) -> Any:
    """A config-only reader for a model listed in ``model_configs``, else a local directory's."""
    from merge_engine.io.config_only import ConfigOnlyReader
    from merge_engine.io.resolve import looks_local

    key = ref.path
    if key in model_configs:
        return ConfigOnlyReader(model_configs[key], name=str(ref), trust_remote_code=trust_remote_code)
    if Path(key).expanduser().is_dir():  # resolved as a merge would (LoRA applied, @revision refused)
        return _model(ref, stack, allow_pickle, trust_remote_code)
    where = "directory does not exist" if looks_local(key) else "is not downloaded"
    raise MergeError(f"model {ref}: {where} and no config is bundled for it; "
                     f"add '{key}: DIR' (a folder with its config.json) to model_configs")


def _model(ref: ModelRef, stack: ExitStack, allow_pickle: bool, trust_remote_code: bool,
           lora_merge_dtype: str | None = None) -> Any:
    """The reader of ``ref``'s own files (local or from the hub), its adapter applied if it names one."""
    from merge_engine.dtypes import torch_dtype
    from merge_engine.io.lora import LoraReader
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.resolve import resolve_adapter_dir, resolve_model_dir

    base = CheckpointReader(resolve_model_dir(ref, allow_pickle=allow_pickle), allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
    if not ref.lora:
        return stack.enter_context(base)
    adapter = resolve_adapter_dir(ref, allow_pickle=allow_pickle)
    merge_dtype = torch_dtype(lora_merge_dtype) if lora_merge_dtype else None
    return stack.enter_context(LoraReader(base, adapter, name=str(ref), allow_pickle=allow_pickle,
                                          merge_dtype=merge_dtype))
