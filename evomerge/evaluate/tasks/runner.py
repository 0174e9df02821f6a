"""Built-once lm-eval tasks, run against any lm-eval ``LM`` once per candidate.

``TaskRunner`` owns what does not depend on the weights: the Task objects (datasets read once),
few-shot settings, the seeded doc subset, the built requests and the metric keys. ``run(lm)`` builds the requests,
calls ``lm_eval.evaluator.evaluate`` and turns its output into an :class:`EvalResult`.
``run(lm, docs=...)`` scores only some docs and also returns each doc's metric item, so scores
over nested doc sets (the rungs of :mod:`evomerge.search.fidelity`) are built without scoring a
doc twice (:meth:`TaskRunner.fold`).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.adapters.lm_eval import reuse_doc_lists, reuse_requests
from evomerge.evaluate.result import EvalResult, TaskScore
from evomerge.evaluate.tasks.catalog import TaskCatalog
from evomerge.evaluate.tasks.config import EvalConfig, EvalConfigError
from evomerge.evaluate.tasks.validate import check_eval_config, resolve_metric

if TYPE_CHECKING:
    from lm_eval.api.model import LM

#: Per-doc metric items of a subset run: leaf task -> doc id -> the item lm-eval's aggregation
#: takes (``EvalResult.extra["docs"]``; JSON-ready for the usual 0/1 and float metrics).
DocItems = dict[str, dict[int, Any]]

# Our defaults for lm_eval.evaluator.evaluate; cfg.lm_eval_args override them.
_EVALUATE_DEFAULTS: dict[str, Any] = {"bootstrap_iters": 1000, "fewshot_random_seed": 1234}


class TaskRunner:
    """Tasks of one :class:`EvalConfig`, built once (validation first, then datasets)."""

    def __init__(self, cfg: EvalConfig, catalog: TaskCatalog | None = None) -> None:
        self.cfg = cfg
        self.catalog = check_eval_config(cfg, catalog)
        self.metric_keys = {s.name: resolve_metric(s, self.catalog) for s in cfg.tasks}
        args = {**_EVALUATE_DEFAULTS, **cfg.lm_eval_args}
        self._fewshot_seed = args.pop("fewshot_random_seed")
        gen_kwargs = args.pop("gen_kwargs", None)
        self._evaluate_args = args

        self.task_dict = load_tasks(self.catalog, [s.name for s in cfg.tasks])
        self.leaves = {s.name: self._leaf_names(s.name) for s in cfg.tasks}
        self._leaf_metric = {leaf: self.metric_keys[s.name] for s in cfg.tasks for leaf in self.leaves[s.name]}
        for spec in cfg.tasks:
            for leaf in self.leaves[spec.name]:
                self._configure(self.task_dict["tasks"][leaf], spec.num_fewshot, gen_kwargs)
        self.samples = select_samples(self.task_dict["tasks"], cfg.limit, cfg.seed)
        for task in self.task_dict["tasks"].values():
            reuse_requests(task)  # requests and docs do not depend on the weights
            reuse_doc_lists(task)

    def run(self, lm: LM, docs: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Evaluate ``lm`` on all tasks; the same docs and few-shot examples on every call.

        ``docs`` (leaf task -> doc ids, each one of :meth:`doc_ids`): score only those docs; the
        result's tasks are folded from the per-doc items (:meth:`fold`, no stderr), which it
        also carries in ``extra["docs"]``. A leaf with no ids is not run at all.
        """
        start = time.perf_counter()
        if docs is None:
            out = self._evaluate(lm, self.task_dict, self.samples or None, log_samples=False)
            return self._to_result(out, time.perf_counter() - start)
        wanted = {leaf: sorted(ids) for leaf, ids in docs.items() if ids}
        if unknown := sorted(set(wanted) - set(self.task_dict["tasks"])):
            raise ValueError(f"no leaf task {unknown} in this evaluation; leaves: {sorted(self.task_dict['tasks'])}")
        items: DocItems = {leaf: {} for leaf in self.task_dict["tasks"]}
        if wanted:
            tasks = {leaf: self.task_dict["tasks"][leaf] for leaf in wanted}
            out = self._evaluate(lm, {"tasks": tasks}, wanted, log_samples=True)
            for leaf in wanted:
                metric, _, filt = self._leaf_metric[leaf].partition(",")
                items[leaf] = {int(ex["doc_id"]): ex[metric] for ex in out["samples"][leaf]
                               if ex.get("filter") == filt}
        result = self.fold(items)
        return EvalResult(result.tasks, sum(len(v) for v in items.values()), time.perf_counter() - start,
                          self.cfg.backend, {"docs": items})

    def doc_ids(self) -> dict[str, list[int]]:
        """Each leaf task's doc ids of the full evaluation (the seeded subset, else all docs)."""
        return {leaf: list(self.samples.get(leaf, range(len(task.eval_docs))))
                for leaf, task in self.task_dict["tasks"].items()}

    def fold(self, items: Mapping[str, Mapping[int, Any]]) -> EvalResult:
        """The result over the docs in ``items`` (per-doc items of one or several subset runs).

        A leaf's value is its task's own aggregation (lm-eval's ``Task.aggregation``) over its
        items, so for a mean metric the union of two doc sets is weighted by their sizes exactly
        as one run over the union would be; a group's value is its leaves' values weighted by
        their doc counts (lm-eval's ``weight_by_size``). A task with no docs is NaN.
        """
        scores = []
        for spec in self.cfg.tasks:
            key = self.metric_keys[spec.name]
            metric = key.partition(",")[0]
            values, sizes = [], []
            for leaf in self.leaves[spec.name]:
                got = items.get(leaf) or {}
                if got:
                    agg = self.task_dict["tasks"][leaf].aggregation()[metric]
                    values.append(float(agg([got[i] for i in sorted(got)])))
                    sizes.append(len(got))
            value = sum(v * n for v, n in zip(values, sizes)) / sum(sizes) if sizes else math.nan
            scores.append(TaskScore(task=spec.name, metric=key, value=value, weight=spec.weight,
                                    n_samples=sum(sizes)))
        return EvalResult(tasks=tuple(scores), n_samples=sum(s.n_samples for s in scores),
                          wall_time_s=0.0, backend=self.cfg.backend)

    def _evaluate(self, lm: LM, task_dict: Any, samples: dict[str, list[int]] | None,
                  *, log_samples: bool) -> dict[str, Any]:
        from lm_eval.evaluator import evaluate

        for task in task_dict["tasks"].values():
            # The sampler's RNG advances while building contexts: reset it so every candidate
            # sees the same few-shot examples.
            task.set_fewshot_seed(seed=self._fewshot_seed)
        with seeded(self.cfg.seed):
            return evaluate(
                lm=lm,
                task_dict=task_dict,
                samples=samples,
                log_samples=log_samples,
                apply_chat_template=self.cfg.apply_chat_template,
                **self._evaluate_args,
            )

    # ------------------------------------------------------------------ internals
    def _leaf_names(self, name: str) -> list[str]:
        groups = self.task_dict.get("groups", {})
        if name in groups:
            return [t.task_name for t in groups[name].get_all_tasks()]
        return [name]

    @staticmethod
    def _configure(task: Any, num_fewshot: int | None, gen_kwargs: Any) -> None:
        # Same rules as lm_eval.simple_evaluate: an explicit 0 in the YAML wins.
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)

    def _to_result(self, out: dict[str, Any], wall: float) -> EvalResult:
        table = {**out.get("results", {}), **out.get("groups", {})}
        n_by_leaf = {k: int(v.get("effective", 0)) for k, v in out.get("n-samples", {}).items()}
        scores = []
        for spec in self.cfg.tasks:
            key = self.metric_keys[spec.name]
            row = table.get(spec.name, {})
            if key not in row:
                raise RuntimeError(
                    f"lm-eval reported no {key!r} for {spec.name!r} (got {sorted(row)}); "
                    "check the task's metric_list / filter_list"
                )
            metric, _, filt = key.partition(",")
            stderr = row.get(f"{metric}_stderr,{filt}")
            scores.append(
                TaskScore(
                    task=spec.name,
                    metric=key,
                    value=float(row[key]),
                    weight=spec.weight,
                    stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                    n_samples=sum(n_by_leaf.get(leaf, 0) for leaf in self.leaves[spec.name]),
                )
            )
        return EvalResult(
            tasks=tuple(scores),
            n_samples=sum(s.n_samples for s in scores),
            wall_time_s=wall,
            backend=self.cfg.backend,
        )


def load_tasks(catalog: TaskCatalog, names: list[str]) -> Any:
    """``catalog.load(names)`` (reads every dataset), with hub datasets answered in one line.

    When the hub does not accept a connection within ``HUB_PROBE_TIMEOUT`` s, datasets are read
    from the datasets cache alone (instead of after the hub client's retries, ~25 s per file).
    A dataset neither in the cache nor reachable raises one :class:`EvalConfigError` line naming
    the dataset, the tasks and the fix.
    """
    from datasets.exceptions import DatasetNotFoundError

    with _cache_only_unless_hub_reachable() as offline:
        try:
            return catalog.load(names)
        except (ConnectionError, DatasetNotFoundError) as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            quoted = re.search(r"'([^'\s]+)'", text)  # ("Couldn't reach 'org/name'")
            dataset = quoted.group(1) if quoted else "a dataset"
            tasks = ", ".join(names)
            if isinstance(err, DatasetNotFoundError) and not offline:
                raise EvalConfigError(
                    f"dataset {dataset} of task(s) {tasks} is not on the hub or is gated ({text}); "
                    "check the task's dataset_path, or accept the dataset's terms on the hub and "
                    "set HF_TOKEN (or run `hf auth login`)") from None
            why = "HF_HUB_OFFLINE is set" if offline == "env" else "the hub is unreachable"
            raise EvalConfigError(
                f"dataset {dataset} of task(s) {tasks} is not in the datasets cache and {why}; "
                "run this command once where the hub is reachable (it fills the cache, "
                "~/.cache/huggingface/datasets or HF_DATASETS_CACHE), then set HF_HUB_OFFLINE=1"
            ) from None


@contextlib.contextmanager
def _cache_only_unless_hub_reachable() -> Iterator[str | None]:
    """Yield ``"env"`` under ``HF_HUB_OFFLINE=1``; ``"probe"`` (and switch the hub client and
    ``datasets`` to their offline mode for the block) when the hub does not answer; else None."""
    import datasets.config
    from huggingface_hub import constants

    from merge_engine.io.resolve import hub_reachable

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        yield "env"
        return
    if hub_reachable():
        yield None
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield "probe"
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def select_samples(
    tasks: dict[str, Any], limit: int | float | None, seed: int
) -> dict[str, list[int]]:
    """Seeded random doc indices per leaf task (sorted), for lm-eval's ``samples=`` argument.

    lm-eval's own ``limit`` takes the first N docs; we take a random N instead. A task with no
    more than N docs is left out of the mapping, which lm-eval reads as "all docs". The choice
    depends only on ``seed``, the task name and its number of docs.
    """
    if limit is None:
        return {}
    chosen: dict[str, list[int]] = {}
    for name, task in tasks.items():
        n_docs = len(task.eval_docs)
        k = int(limit) if limit >= 1 else max(1, int(round(n_docs * limit)))
        if k < n_docs:
            rng = random.Random(f"{seed}/{name}")
            chosen[name] = sorted(rng.sample(range(n_docs), k))
    return chosen


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch RNGs for the block, then restore their previous states."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
