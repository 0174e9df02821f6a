"""One run of a search: open (or resume) the study, evaluate candidates until the budget of
finished trials is reached, score the best ones on the held-out report split, write the results.

    summary = run_search(space, RunOptions(out_dir=Path("runs/x")))     # starts or resumes
    summary = run_worker(storage_url, study_name)                       # joins from anywhere

Lifecycle of one run: one storage, one study, one resident :class:`~evomerge.candidate.Candidate`
(the base model, merged into in place per trial) and one set of evaluators, closed at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from evomerge.candidate import Candidate
from evomerge.errors import EvomergeError
from evomerge.search.samplers import sampler_problems
from evomerge.results.files import write_results
from evomerge.results.store import sample_stats, top_trials, trial_stages_of
from evomerge.search.anchor_inputs import score_anchor_inputs, store_anchor_inputs
from evomerge.search.held_out import evaluate_held_out
from evomerge.search.objectives import counting_evaluators
from evomerge.search.loop import Evaluators, LoopOutcome, Progress, Propose, count_finished, search_loop
from evomerge.search.preflight import check_models, claim_out_dir, sampler_seed, stored_trial_count
from evomerge.search.study import (Heartbeat, default_storage, enqueue_start_points, load_stored_study,
                                   open_existing_storage, open_storage, open_study, space_from_study)
from evomerge.search.workers import claim_worker_slot, retry_dead_trials
from evomerge.space import SearchSpace
from evomerge.space.genome import trial_candidate


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
    # local paths written back as ${NAME} in the result files ({"ZOO": zoo_dir} for the demo)
    placeholders: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler is not None and (problems := sampler_problems(self.sampler, None)):
            raise EvomergeError(problems[0])
        if self.trials is not None and (isinstance(self.trials, bool) or self.trials < 0):
            raise EvomergeError(f"trials must be a whole number >= 0 (0: the space's budget), got {self.trials!r}")
        if self.timeout is not None and not 0 < self.timeout < float("inf"):
            raise EvomergeError(f"timeout must be a number of seconds above 0, got {self.timeout!r}")


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


def resident_candidate(space: SearchSpace, device: str = "cpu") -> Candidate:
    """The resident model of a search: the base model (else the first model) in the space's dtype."""
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    from evomerge.space.stages import resident_model

    return Candidate.load(resolve_model_dir(ModelRef.parse(resident_model(space))), dtype=space.dtype, device=device,
                          eval_cfg=space.eval, lora_merge_dtype=space.lora_merge_dtype,
                          task_vector_cache_bytes=space.task_vector_cache)


def run_search(space: SearchSpace, options: RunOptions, *,
               progress: Callable[[Progress], None] | None = None,
               evaluators: dict[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> SearchSummary:
    """Run (or resume) a search and write its results to ``options.out_dir``. ``evaluators``
    (keys ``search``, ``ladder``, ``report``) replaces the real ones; ``log`` gets one line per
    step that may take seconds (loading, building tasks, held-out scoring, writing).

    Everything is checked before anything is written: the tasks, every method's models, the
    start recipes, the storage and the output folder (see :mod:`evomerge.search.preflight`).
    """
    say = log or (lambda text: None)
    if problems := sampler_problems(options.sampler, len(space.objectives)):
        raise EvomergeError(problems[0])  # before anything is written
    say("checking the models of every method")
    points = check_models(space)
    study, storage, outcome = run_study(
        space, options, sampler=options.sampler, evaluators=evaluators, progress=progress, say=say,
        load_candidate=lambda: resident_candidate(space, options.device),
        # after retry_dead_trials: a new study gets the start points only once
        enqueue_start=lambda study, known: enqueue_start_points(study, space, points),
        held_out=evaluate_held_out)
    out_dir = Path(options.out_dir)
    say(f"writing results to {out_dir}")
    files = write_results(study, out_dir, options.placeholders)
    if options.materialize:
        say("writing the best merge as a model")
        files["model"] = materialize_best(study, out_dir / "best_model", device=options.device)
    return summarize(study, storage, out_dir, outcome, files)


def run_study(space: SearchSpace, options: RunOptions, *, sampler: str | None,
              evaluators: dict[str, Any] | None, progress: Callable[[Progress], None] | None,
              say: Callable[[str], None], load_candidate: Callable[[], Any],
              enqueue_start: Callable[[optuna.Study, int], None],
              held_out: Callable[..., None],
              propose: Propose = trial_candidate) -> tuple[optuna.Study, str, LoopOutcome]:
    """The lifecycle every kind of search shares (a merge search, an MoE search): build the
    evaluators, claim the output folder, load the resident candidate (``load_candidate()``, a
    context manager), then — nothing written before this point — open or resume the study, mark
    dead trials, ``enqueue_start(study, trials stored before this run)``, run the loop and score
    the best on the held-out split (``held_out(study, space, candidate, evals, log=)``).
    ``propose(space, trial)`` builds each trial's candidate for the resident model.
    Returns the study, its storage URL and the loop's outcome; writing results is the caller's."""
    out_dir = Path(options.out_dir)
    storage = options.storage or default_storage(out_dir)
    study_name = options.study_name or space.name
    trials = options.trials or space.budget.trials
    timeout = options.timeout if options.timeout is not None else space.budget.timeout
    beat = Heartbeat.from_env()
    with ExitStack() as stack:
        say("building the evaluation tasks")
        evals = counting_evaluators(space, stack.enter_context(
            Evaluators(**evaluators) if evaluators is not None else Evaluators.for_space(space, options.device)))
        # the storage is opened once for the run (not yet when its SQLite file does not exist)
        opened = open_existing_storage(storage, heartbeat=beat)
        known = stored_trial_count(storage, study_name, storage=opened)
        claim_out_dir(out_dir, storage, study_name, storage=opened)
        say("loading the resident model")
        candidate = stack.enter_context(load_candidate())
        anchor_inputs = score_anchor_inputs(space, candidate, evals, known, say)  # a new study's
        # nothing was written up to here: a bad space, task, model or folder leaves no trace
        out_dir.mkdir(parents=True, exist_ok=True)
        study = open_study(space, storage=opened or open_storage(storage, heartbeat=beat), study_name=study_name,
                           sampler=sampler, seed=sampler_seed(space.seed, known))
        store_anchor_inputs(study, anchor_inputs)  # before any trial can finish: every worker fits on them
        if known:
            say(f"resuming study {study_name} ({count_finished(study)} finished trials)")
        if options.placeholders:  # `evomerge export` writes portable files too
            study.set_user_attr("placeholders", dict(options.placeholders))
        retry_dead_trials(study, beat)  # before the start points: a new study gets them only once
        enqueue_start(study, known)
        outcome = search_loop(study, space, candidate, evals, trials=trials, timeout=timeout,
                              progress=progress, beat=beat, propose=propose)
        log_cache(candidate, say)
        held_out(study, space, candidate, evals, log=say)
    return study, storage, outcome


def run_worker(storage: str, study_name: str, *, trials: int | None = None, device: str = "cpu",
               progress: Callable[[Progress], None] | None = None,
               log: Callable[[str], None] | None = None) -> SearchSummary:
    """Join an existing study: evaluate candidates until it has ``trials`` finished trials
    (default: its space's budget). Needs nothing but the storage URL and the study name (not
    the start-recipe files, which only the study's creator reads); results are written by
    ``evomerge export`` (or the process that started the search). Worker k (the k-th to join,
    :func:`~evomerge.search.workers.claim_worker_slot`) seeds its sampler from the space's seed
    and k, so workers propose different candidates, reproducibly."""
    say = log or (lambda text: None)
    beat = Heartbeat.from_env()
    opened = open_storage(storage, heartbeat=beat)
    stored = load_stored_study(opened, study_name)
    space = space_from_study(stored)
    study = open_study(space, storage=opened, study_name=study_name,
                       seed=sampler_seed(space.seed, None, worker=claim_worker_slot(stored)))
    say(f"joining study {study_name} ({count_finished(study)} finished trials)")
    say("building the evaluation tasks")
    with counting_evaluators(space, Evaluators.for_space(space, device)) as evals:
        say("loading the resident model")
        with resident_candidate(space, device) as candidate:
            outcome = search_loop(study, space, candidate, evals, trials=trials or space.budget.trials,
                                  timeout=space.budget.timeout, progress=progress, beat=beat)
            log_cache(candidate, say)
    return summarize(study, storage, Path("."), outcome, {})


def log_cache(candidate: Any, say: Callable[[str], None]) -> None:
    """After a run's trials: what the candidate's per-run task-vector cache held (when used)."""
    if (line := candidate.cache_summary()) is not None:
        say(line)


def materialize_best(study: optuna.Study, out_dir: Path, *, device: str = "cpu") -> Path:
    """Write the best trial's merge as a model directory (replacing an older one)."""
    from merge_engine.merge import run_merge
    from merge_engine.multistage import run_stages

    best = top_trials(study, 1)
    if not best:
        raise EvomergeError("no completed trial to materialize; run more trials")
    stages = trial_stages_of(best[0])
    lora_dtype = space_from_study(study).lora_merge_dtype
    if len(stages) == 1:
        run_merge(stages[0].recipe, out_dir, device=device, force=True, lora_merge_dtype=lora_dtype)
    else:
        run_stages(stages, out_dir, device=device, force=True, lora_merge_dtype=lora_dtype)
    return out_dir


def summarize(study: optuna.Study, storage: str, out_dir: Path, outcome: LoopOutcome,
              files: dict[str, Path]) -> SearchSummary:
    stats = sample_stats(study)
    return SearchSummary(study.study_name, storage, out_dir, count_finished(study), outcome.failed,
                         stats["samples"], stats["samples_without_pruning"], outcome.stopped, files)


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs one INFO line per trial; the CLI prints its own progress line instead."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
