"""The task catalog: lm-eval's task index, read without loading any dataset.

A :class:`TaskCatalog` wraps one ``lm_eval.tasks.TaskManager``. Build it once per run and pass it
to both :func:`~evomerge.evaluate.tasks.validate.validate_eval_config` and the evaluator: indexing the
~12k built-in task YAMLs costs ~16 s, so :meth:`TaskCatalog.for_config` indexes only the local
include paths unless a requested task is not found there.

Local task YAMLs may give ``dataset_kwargs.data_files`` relative to the YAML's own folder; the
catalog rewrites them to absolute paths (lm-eval itself resolves them against the process's
working directory).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.adapters.lm_eval import TaskIndex, rebase_data_files
from evomerge.evaluate.tasks.config import EvalConfig, effective_include_paths

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.manager import TaskDict

# lm-eval's metrics for a task whose YAML has no metric_list (lm_eval.api.registry).
_DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}


class TaskCatalog:
    """Names, kinds and reported metric keys (``"metric,filter"``) of the indexed tasks."""

    def __init__(self, include_paths: list[Path], *, include_defaults: bool = False) -> None:
        from lm_eval.tasks import TaskManager

        self.include_paths = [p for p in include_paths if p.is_dir()]
        self.include_defaults = include_defaults
        self.manager: TaskManager = TaskManager(
            include_path=[str(p) for p in self.include_paths] or None,
            include_defaults=include_defaults,
        )
        self._task_code = _task_code_files(self.include_paths)
        self._rebased = False
        self.index = TaskIndex(self.manager)

    @classmethod
    def for_config(cls, cfg: EvalConfig) -> TaskCatalog:
        """Index the config's include paths; add lm-eval's built-ins only if a task is missing."""
        local = cls(effective_include_paths(cfg), include_defaults=False)
        if all(spec.name in local for spec in cfg.tasks):
            return local
        return cls(effective_include_paths(cfg), include_defaults=True)

    # ------------------------------------------------------------------ lookups
    def __contains__(self, name: str) -> bool:
        return name in self.index

    def kind(self, name: str) -> str:
        """``"task"``, ``"python_task"``, ``"group"`` or ``"tag"``."""
        return self.index.kind(name)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """Up to ``n`` indexed names closest to ``name``."""
        return difflib.get_close_matches(name, self.manager.all_tasks, n=n, cutoff=0.6)

    def metric_keys(self, name: str) -> list[str] | None:
        """The ``"metric,filter"`` keys lm-eval reports for ``name``, in YAML order.

        ``None`` when that cannot be read from the YAML (a Python-class task). A group reports its
        ``aggregate_metric_list``; a group without one, or a tag, reports nothing (``[]``).
        """
        cfg = self.index.config(name)
        kind = self.kind(name)
        if kind == "python_task":
            return None
        if kind == "tag":
            return []
        if kind == "group":
            aggs = cfg.get("aggregate_metric_list") or []
            aggs = [aggs] if isinstance(aggs, dict) else aggs
            keys: list[str] = []
            for agg in aggs:
                filters = agg.get("filter_list")
                if filters is None:  # lm-eval discovers the filters its members report
                    filters = self._member_filters(name, str(agg["metric"]))
                filters = [filters] if isinstance(filters, str) else filters
                keys += [f"{agg['metric']},{f}" for f in filters if f"{agg['metric']},{f}" not in keys]
            return keys
        metric_list = cfg.get("metric_list")
        if metric_list:
            metrics = [str(m["metric"]) for m in metric_list]
        else:
            metrics = _DEFAULT_METRICS.get(cfg.get("output_type", "generate_until"), [])
        filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
        return [f"{m},{f}" for f in filters for m in metrics]

    def task_code_file(self, name: str) -> Path | None:
        """The YAML of local task ``name`` when it runs Python code through ``!function``
        (lm-eval imports that code when the task is built); None for other tasks and for
        lm-eval's built-in tasks (code of an installed package, like lm-eval itself)."""
        return self._task_code.get(name)

    def leaf_names(self, name: str) -> set[str]:
        """Names of the leaf tasks ``name`` expands to (itself for a task), read from the YAMLs."""
        if name not in self:
            return {name}
        kind = self.kind(name)
        if kind == "tag":
            tags = self.index.tags(name)
            return set().union(*(self.leaf_names(t) for t in tags)) if tags else set()
        if kind != "group":
            return {name}
        leaves: set[str] = set()
        members = self.index.config(name).get("task") or []
        for member in [members] if isinstance(members, (str, dict)) else members:
            if isinstance(member, dict):
                member = member.get("group") or member.get("task")
            leaves |= self.leaf_names(str(member))
        return leaves

    def _member_filters(self, group: str, metric: str) -> list[str]:
        filters: list[str] = []
        for leaf in sorted(self.leaf_names(group)):
            if leaf not in self:
                continue
            for key in self.metric_keys(leaf) or [f"{metric},none"]:
                m, _, f = key.partition(",")
                if m == metric and f not in filters:
                    filters.append(f)
        return filters

    def output_type(self, name: str) -> str | None:
        """The task's ``output_type`` (``None`` for groups, tags and Python tasks)."""
        if self.kind(name) != "task":
            return None
        return self.index.config(name).get("output_type")

    # ------------------------------------------------------------------ loading
    def load(self, names: list[str]) -> TaskDict:
        """Build the Task objects (this downloads/reads their datasets). Costly: do it once."""
        if not self._rebased:
            # lm-eval resolves relative data_files against the working directory, not the YAML.
            # Rebasing rebuilds a task from its full YAML, which imports its !function code: so
            # only here, once the config (and its allow_task_code opt-in) has been validated.
            rebase_data_files(self.manager, self.include_paths, _absolute_data_files)
            self._rebased = True
        return self.manager.load(list(names))


def _absolute_data_files(data_files: Any, base: Path) -> Any | None:
    """``data_files`` with relative paths that exist under ``base`` made absolute; ``None`` if
    nothing needed changing."""
    changed = False

    def fix(p: str) -> str:
        nonlocal changed
        path = Path(p)
        if path.is_absolute() or not (base / path).exists():
            return p
        changed = True
        return str(base / path)

    if isinstance(data_files, str):
        out: Any = fix(data_files)
    elif isinstance(data_files, list):
        out = [fix(p) for p in data_files]
    elif isinstance(data_files, dict):
        out = {k: fix(v) if isinstance(v, str) else [fix(p) for p in v] for k, v in data_files.items()}
    else:
        return None
    return out if changed else None


_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def _task_code_files(roots: list[Path]) -> dict[str, Path]:
    """``{task name: YAML file}`` for the task YAMLs under ``roots`` that use ``!function``,
    themselves or through the YAMLs they ``include:`` (read as text: the tag is what matters,
    before lm-eval would import anything)."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            text = _read(path)
            if text is not None and _uses_task_code(path, text, set()):
                found.update({name: path for name in _TASK_LINE.findall(text)})
    return found


_INCLUDE_LINE = re.compile(r"^include:\s*['\"]?([^'\"#\n]+?)['\"]?\s*$", re.MULTILINE)


def _uses_task_code(path: Path, text: str, seen: set[Path]) -> bool:
    if "!function" in text:
        return True
    seen.add(path.resolve())
    for target in _INCLUDE_LINE.findall(text):
        included = (path.parent / target.strip()).resolve()
        if included not in seen and (sub := _read(included)) is not None \
                and _uses_task_code(included, sub, seen):
            return True
    return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None
