"""Check an :class:`EvalConfig` against the task catalog before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from evomerge.evaluate.tasks.catalog import TaskCatalog
from evomerge.evaluate.tasks.config import EvalConfig, EvalConfigError, TaskSpec


def validate_eval_config(cfg: EvalConfig, catalog: TaskCatalog | None = None) -> list[str]:
    """Every problem that would stop ``cfg`` from running, one line each (empty: it can run).

    Reads task YAMLs only (no datasets, no model): include paths exist, each task name is
    indexed (with close-name suggestions), it is a task or an aggregating group (not a tag), and it
    reports the requested metric. Pass the run's ``catalog`` to avoid indexing twice.
    """
    problems = [
        f"include path {p!r} does not exist; pass an existing folder of lm-eval task YAMLs"
        for p in cfg.include_paths
        if not Path(p).expanduser().is_dir()
    ]
    catalog = catalog or TaskCatalog.for_config(cfg)
    for spec in cfg.tasks:
        problems += _task_problems(spec, catalog)
    problems += _overlap_problems(cfg, catalog)
    if not cfg.allow_task_code:
        problems += _task_code_problems(cfg, catalog)
    return problems


def check_eval_config(cfg: EvalConfig, catalog: TaskCatalog | None = None) -> TaskCatalog:
    """Raise :class:`EvalConfigError` listing all problems; return the catalog used."""
    catalog = catalog or TaskCatalog.for_config(cfg)
    problems = validate_eval_config(cfg, catalog)
    if problems:
        raise EvalConfigError(problems, source="eval config")
    return catalog


def resolve_metric(spec: TaskSpec, catalog: TaskCatalog) -> str:
    """The ``"metric,filter"`` key lm-eval will report for ``spec``.

    ``spec.metric=None`` → the task's first metric under its first filter; ``"acc"`` → ``"acc"``
    under the first filter that reports it. Raises :class:`EvalConfigError` if there is none.
    """
    keys = catalog.metric_keys(spec.name)
    if keys is None:  # Python task: trust the config, lm-eval's default filter is "none"
        metric = spec.metric or "acc"
        return metric if "," in metric else f"{metric},none"
    if not keys:
        raise EvalConfigError(_no_metric_message(spec.name, catalog))
    if spec.metric is None:
        return keys[0]
    if "," in spec.metric:
        if spec.metric in keys:
            return spec.metric
    else:
        for key in keys:
            if key.split(",", 1)[0] == spec.metric:
                return key
    raise EvalConfigError(
        f"task {spec.name!r} does not report metric {spec.metric!r}; it reports {keys}"
    )


def _task_code_problems(cfg: EvalConfig, catalog: TaskCatalog) -> list[str]:
    """Local tasks whose YAML runs Python code (``!function``) need the user's opt-in."""
    problems = []
    for spec in cfg.tasks:
        for leaf in sorted(catalog.leaf_names(spec.name)) if spec.name in catalog else []:
            path = catalog.task_code_file(leaf)
            if path is not None:
                problems.append(f"task {leaf!r} runs Python code (!function in {path}); if you trust "
                                "that folder, set allow_task_code: true in the eval config "
                                "(evomerge eval: --allow-task-code)")
    return problems


def _task_problems(spec: TaskSpec, catalog: TaskCatalog) -> list[str]:
    if spec.name not in catalog:
        close = catalog.suggest(spec.name)
        hint = f"; did you mean {close}?" if close else "; check the name or add --include-path"
        where = "local include paths and lm-eval's built-in tasks" if catalog.include_defaults else (
            "local include paths"
        )
        return [f"unknown eval task {spec.name!r} (searched {where}){hint}"]
    if catalog.kind(spec.name) == "tag":
        return [_no_metric_message(spec.name, catalog)]
    try:
        resolve_metric(spec, catalog)
    except EvalConfigError as err:
        return [str(err)]
    return []


def _overlap_problems(cfg: EvalConfig, catalog: TaskCatalog) -> list[str]:
    """lm-eval refuses to run one leaf task twice (standalone and inside a group, or in two)."""
    owner: dict[str, str] = {}
    problems = []
    for spec in cfg.tasks:
        if spec.name not in catalog:
            continue
        for leaf in sorted(catalog.leaf_names(spec.name)):
            if leaf in owner:
                problems.append(
                    f"task {leaf!r} is part of both {owner[leaf]!r} and {spec.name!r}; "
                    "lm-eval runs each task once, so drop one of them"
                )
            owner.setdefault(leaf, spec.name)
    return problems


def _no_metric_message(name: str, catalog: TaskCatalog) -> str:
    what = "a tag" if catalog.kind(name) == "tag" else "a group without aggregate_metric_list"
    return (
        f"{name!r} is {what}, so lm-eval reports no single score for it; "
        "list its member tasks instead"
    )
