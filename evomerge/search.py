"""The search loop on Optuna's ask/tell: ask → recipe → apply in place → evaluate → tell.

:func:`run_search` opens (or resumes) a study, evaluates candidates until the budget of finished
trials is reached, scores the best ones on the held-out report split and writes the results.
A candidate that fails is told FAIL with its cause in the trial's user attrs; the search goes on.

Everything a worker needs to join a study lives in the study itself: the search space (with its
eval settings) is stored in the study's user attrs (:func:`space_from_study`).
"""

from __future__ import annotations

import math
from datetime import datetime
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge import results
from evomerge.errors import EvomergeError
from evomerge.samplers import make_pruner, make_sampler
from evomerge.space import SCORE, SearchSpace
from evomerge.storage import ask, heartbeat, open_storage, redact
from merge_engine.errors import NonFiniteError
from merge_engine.recipe import MergeRecipe, parse_recipe

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Fields of a space that may change between runs of one study (a resume with a larger budget).
_RESUMABLE_FIELDS = ("budget", "sampler", "top_k", "report_eval", "start")


@dataclass(frozen=True)
class RunOptions:
    """Command-line overrides of a space's settings, and where the run writes."""

    out_dir: Path
    storage: str | None = None       # default: sqlite:///<out_dir>/study.db
    study_name: str | None = None    # default: the space's name
    sampler: str | None = None
    trials: int | None = None
    timeout: float | None = None
    materialize: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class Progress:
    """One line of progress, sent after every trial."""

    done: int
    total: int
    trial: int
    state: str
    values: list[float] | None
    best: list[float] | None
    seconds: float
    eta: float | None


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    out_dir: Path
    finished: int
    failed_this_run: int
    samples: int
    samples_without_pruning: int
    stopped: str | None = None
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------- the workbench
class Workbench:
    """The resident model, its in-place merger and the evaluators of one run.

    Lifecycle: built once per run (loads the base model, builds the lm-eval tasks once);
    :meth:`apply` then an evaluator's ``evaluate(bench.model, bench.tokenizer)`` once per
    candidate; :meth:`close` at the end (also via ``with``).

    ``evaluators`` replaces the real ones (keys ``search``, ``cheap``, ``report``); the search
    only calls ``evaluate(model, tokenizer) -> EvalResult`` and ``close()`` on them.
    """

    def __init__(self, space: SearchSpace, *, device: str = "cpu",
                 evaluators: dict[str, Any] | None = None) -> None:
        from evomerge.candidate import load_causal_lm
        from merge_engine.apply import InMemoryMerger
        from merge_engine.io.refs import ModelRef
        from merge_engine.io.resolve import resolve_model_dir

        resident = space.base_model or space.models[0]
        folder = resolve_model_dir(ModelRef.parse(resident.model))
        self.model, self.tokenizer = load_causal_lm(folder, dtype=space.dtype, device=device)
        self.merger = InMemoryMerger(self.model, device=device)
        self.evaluators = dict(evaluators) if evaluators is not None else _make_evaluators(space, device)

    @property
    def search(self) -> Any:
        return self.evaluators["search"]

    @property
    def cheap(self) -> Any | None:
        return self.evaluators.get("cheap")

    @property
    def report(self) -> Any | None:
        return self.evaluators.get("report")

    def apply(self, recipe: MergeRecipe) -> None:
        """Write ``recipe``'s merge into the resident model.

        The engine checks every merged tensor before writing it and raises NonFiniteError
        naming the tensor (the resident model then keeps that tensor's previous values).
        """
        self.merger.apply(recipe)

    def close(self) -> None:
        for ev in {id(e): e for e in self.evaluators.values()}.values():
            ev.close()
        self.merger.close()

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_evaluators(space: SearchSpace, device: str) -> dict[str, Any]:
    from evomerge.evaluate import TaskCatalog, make_evaluator

    catalog = TaskCatalog.for_config(space.eval)
    out = {"search": make_evaluator(space.eval, device=device, catalog=catalog)}
    if space.pruning is not None:
        cheap = space.eval.model_copy(update={"limit": space.pruning.limit})
        out["cheap"] = make_evaluator(cheap, device=device, catalog=catalog)
    if space.report_eval is not None:
        same = space.report_eval.include_paths == space.eval.include_paths
        out["report"] = make_evaluator(space.report_eval, device=device,
                                       catalog=catalog if same else None)
    return out


# ---------------------------------------------------------------- the study
def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def open_study(space: SearchSpace, *, storage: str | optuna.storages.BaseStorage, study_name: str,
               sampler: str | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (its space must match this one)."""
    sampler_name = sampler or space.default_sampler
    study = optuna.create_study(
        storage=storage, study_name=study_name, load_if_exists=True,
        directions=space.directions,
        sampler=make_sampler(sampler_name, seed=space.seed, n_objectives=len(space.objectives),
                             pruning=space.pruning is not None, budget=space.budget.trials),
        pruner=make_pruner(space.pruning))
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space.model_dump(mode="json"))
        study.set_user_attr("objectives", list(space.objectives))
        study.set_user_attr("evomerge_version", results.evomerge_version())
        study.set_user_attr("checkpoints", results.checkpoint_fingerprints(space))
    elif _comparable(stored) != _comparable(space.model_dump(mode="json")):
        raise EvomergeError(f"study {study_name!r} in {redact(storage)} was created from a "
                            "different search space; use the same space file or a new --study name")
    return study


def _comparable(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k not in _RESUMABLE_FIELDS}


def space_from_study(study: optuna.Study) -> SearchSpace:
    """The search space a study was created with (a worker needs nothing else to join)."""
    stored = study.user_attrs.get("space")
    if stored is None:
        raise EvomergeError(f"study {study.study_name!r} holds no evomerge search space; "
                            "was it created by `evomerge search`?")
    return SearchSpace.model_validate(stored)


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials of dead processes on this host FAIL and enqueue their params again."""
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_stale(t):
            continue
        optuna.trial.Trial(study, t._trial_id).set_user_attr(
            "error", "interrupted: the process running it stopped; its params were enqueued again")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        attrs = {k: t.user_attrs[k] for k in ("start_point",) if k in t.user_attrs}
        study.enqueue_trial(t.params, user_attrs={**attrs, "retry_of": t.number})
        recovered.append(t.number)
    return recovered


def _worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _is_stale(t: FrozenTrial) -> bool:
    worker = t.user_attrs.get("worker")
    if not isinstance(worker, dict):
        # asked but not yet started: another worker may be just about to start it, so only a
        # trial older than the heartbeat grace period counts as abandoned
        started = t.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > 60
    if worker.get("host") != socket.gethostname():
        return False  # another host's trial is that host's to finish
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue_start_points(study: optuna.Study, space: SearchSpace) -> int:
    """Enqueue the space's start points once, when the study is new."""
    if study.get_trials(deepcopy=False):
        return 0
    points = space.start_points()
    for label, params in points:
        study.enqueue_trial(params, user_attrs={"start_point": label})
    return len(points)


# ---------------------------------------------------------------- one candidate
def objective_values(space: SearchSpace, result: Any) -> list[float]:
    """The values told to Optuna: the weighted score and/or per-task metrics."""
    values = [result.score if o == SCORE else result.metric(o) for o in space.objectives]
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteError(f"the evaluation returned a non-finite objective {values}")
    return values


def _record(trial: optuna.Trial, stage: str, result: Any) -> None:
    trial.set_user_attr(f"{stage}_scores", {t.task: t.value for t in result.tasks})
    trial.set_user_attr(f"{stage}_samples", result.n_samples)
    trial.set_user_attr(f"{stage}_seconds", round(result.wall_time_s, 3))


def run_trial(trial: optuna.Trial, space: SearchSpace, bench: Workbench) -> list[float]:
    """Score one candidate; raises ``optuna.TrialPruned`` when the cheap-first check stops it."""
    recipe = space.recipe(trial)
    trial.set_user_attr("recipe", recipe.to_yaml())
    trial.set_user_attr("seed", {"merge": recipe.seed, "eval": space.eval.seed})
    bench.apply(recipe)
    if bench.cheap is not None:
        cheap = bench.cheap.evaluate(bench.model, bench.tokenizer)
        _record(trial, "cheap", cheap)
        trial.report(cheap.score, step=0)
        if trial.should_prune():
            raise optuna.TrialPruned(f"cheap-first score {cheap.score:.4f} below the pruning bar")
    result = bench.search.evaluate(bench.model, bench.tokenizer)
    _record(trial, "search", result)
    return objective_values(space, result)


def tell_outcome(study: optuna.Study, trial: optuna.Trial, space: SearchSpace,
                 bench: Workbench) -> TrialState:
    """Run the candidate and tell Optuna how it ended; only KeyboardInterrupt propagates."""
    try:
        values = run_trial(trial, space, bench)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted by the user; its params were enqueued again")
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    except Exception as err:  # a bad candidate must not end the search
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    study.tell(trial, values)
    return TrialState.COMPLETE


# ---------------------------------------------------------------- the loop
def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search_loop(study: optuna.Study, space: SearchSpace, bench: Workbench, *, trials: int,
                timeout: float | None, progress: Callable[[Progress], None] | None = None) -> str | None:
    """Evaluate candidates until ``trials`` finished trials exist; returns why it stopped early."""
    start, failures = time.monotonic(), 0
    max_failures = space.budget.max_failures or max(10, trials)
    done_at_start = count_finished(study)
    while (done := count_finished(study)) < trials:
        if timeout is not None and time.monotonic() - start > timeout:
            return f"timeout of {timeout:g}s reached"
        if failures >= max_failures:
            return f"{failures} candidates failed in this run; see the error column of trials.csv"
        t0 = time.monotonic()
        trial = ask(study)  # first fails the trials of dead workers (heartbeat) and retries them
        with heartbeat(study, trial):
            trial.set_user_attr("worker", _worker_id())
            state = tell_outcome(study, trial, space, bench)
        failures += state == TrialState.FAIL
        if progress is not None:
            progress(_progress(study, trial.number, state, trials, done_at_start, start, t0))
    return None


def _progress(study: optuna.Study, number: int, state: TrialState, total: int, done_at_start: int,
              start: float, t0: float) -> Progress:
    now = time.monotonic()
    done = count_finished(study)
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    best = results.best_values(study)
    rate = (now - start) / max(done - done_at_start, 1)
    eta = rate * (total - done) if done > done_at_start else None
    return Progress(done, total, number, state.name, frozen.values if frozen else None, best,
                    now - t0, eta)


# ---------------------------------------------------------------- held-out report
def one_model_recipe(path: str, dtype: str) -> MergeRecipe:
    """A recipe that reproduces one input model exactly (for baseline scores)."""
    return parse_recipe({"merge_method": "linear", "dtype": dtype,
                         "models": [{"model": path, "parameters": {"weight": 1.0}}]})


def _scores(bench: Workbench, recipe: MergeRecipe, evaluators: dict[str, Any]) -> dict[str, Any]:
    """``{name: EvalResult dict}`` for ``recipe``, or ``{"error": ...}`` when it cannot be scored."""
    try:
        bench.apply(recipe)
        return {name: ev.evaluate(bench.model, bench.tokenizer).to_dict() for name, ev in evaluators.items()}
    except Exception as err:  # one unscorable result must not lose the others
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


def evaluate_held_out(study: optuna.Study, space: SearchSpace, bench: Workbench) -> None:
    """Score the top-k trials and every input model on the report split (kept in the study,
    so a resumed run or an export finds them; nothing is scored twice)."""
    if bench.report is None:
        return
    report = dict(study.user_attrs.get("report", {}))
    for t in results.top_trials(study, space.top_k):
        if str(t.number) not in report:
            recipe = parse_recipe(yaml.safe_load(t.user_attrs["recipe"]))
            got = _scores(bench, recipe, {"report": bench.report})
            report[str(t.number)] = got.get("report", got)
            study.set_user_attr("report", report)
    inputs = dict(study.user_attrs.get("inputs", {}))
    for m in ([space.base_model] if space.base_model else []) + list(space.models):
        if m.name not in inputs:
            got = _scores(bench, one_model_recipe(m.model, space.dtype),
                          {"search": bench.search, "report": bench.report})
            inputs[m.name] = {"model": m.model, **got}
            study.set_user_attr("inputs", inputs)


# ---------------------------------------------------------------- one run
def run_search(space: SearchSpace, options: RunOptions, *,
               progress: Callable[[Progress], None] | None = None,
               evaluators: dict[str, Any] | None = None) -> SearchSummary:
    """Run (or resume) a search and write its results to ``options.out_dir``."""
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = options.storage or default_storage(out_dir)
    study_name = options.study_name or space.name
    trials = options.trials or space.budget.trials
    timeout = options.timeout if options.timeout is not None else space.budget.timeout

    study = open_study(space, storage=open_storage(storage), study_name=study_name,
                       sampler=options.sampler)
    recover_stale_trials(study)
    enqueue_start_points(study, space)
    stopped = None
    with Workbench(space, device=options.device, evaluators=evaluators) as bench:
        stopped = search_loop(study, space, bench, trials=trials, timeout=timeout, progress=progress)
        evaluate_held_out(study, space, bench)
    files = results.write_results(study, out_dir)
    if options.materialize:
        files["model"] = materialize_best(study, out_dir / "best_model", device=options.device)
    return _summary(study, storage, out_dir, stopped, files)


def run_worker(storage: str, study_name: str, *, trials: int | None = None, device: str = "cpu",
               progress: Callable[[Progress], None] | None = None) -> SearchSummary:
    """Join an existing study: evaluate candidates until it has ``trials`` finished trials
    (default: its space's budget). Needs nothing but the storage URL and the study name; results
    are written by ``evomerge export`` (or the process that started the search)."""
    opened = open_storage(storage)
    try:
        stored = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        raise EvomergeError(f"no study {study_name!r} in {redact(storage)}; "
                            f"studies there: {optuna.get_all_study_names(opened)}") from None
    space = space_from_study(stored)
    study = open_study(space, storage=opened, study_name=study_name)
    recover_stale_trials(study)
    with Workbench(space, device=device) as bench:
        stopped = search_loop(study, space, bench, trials=trials or space.budget.trials,
                              timeout=space.budget.timeout, progress=progress)
    return _summary(study, storage, Path("."), stopped, {})


def materialize_best(study: optuna.Study, out_dir: Path, *, device: str = "cpu") -> Path:
    """Write the best trial's merge as a model directory (replacing an older one)."""
    from merge_engine.merge import run_merge

    best = results.top_trials(study, 1)
    if not best:
        raise EvomergeError("no completed trial to materialize; run more trials")
    recipe = parse_recipe(yaml.safe_load(best[0].user_attrs["recipe"]))
    run_merge(recipe, out_dir, device=device, force=True)
    return out_dir


def _summary(study: optuna.Study, storage: str, out_dir: Path, stopped: str | None,
             files: dict[str, Path]) -> SearchSummary:
    stats = results.sample_stats(study)
    failed = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                 if (t.user_attrs.get("worker") or {}).get("pid") == os.getpid())
    return SearchSummary(study.study_name, storage, out_dir, count_finished(study), failed,
                         stats["samples"], stats["samples_without_pruning"], stopped, files)


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs one INFO line per trial; the CLI prints its own progress line instead."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
