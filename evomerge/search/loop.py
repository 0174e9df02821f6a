"""The search loop on Optuna's ask/tell: ask → recipe → apply in place → evaluate → tell.

One candidate per trial: ``propose(space, trial)`` builds (and validates) it once, a
:class:`~evomerge.proposal.Proposal` (by default :func:`~evomerge.space.genome.trial_candidate`:
a recipe or a multi-stage recipe; an MoE search proposes MoE builds); it is stored in the trial
(user attr ``recipe``) and written into the resident model (a :class:`~evomerge.proposal.Resident`).
A candidate that fails is told FAIL with its cause in the trial's user attrs; the search goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.proposal import Proposal, Resident
from evomerge.results.store import top_trials
from evomerge.search.fidelity import RungLadder, climb
from evomerge.search.objectives import objective_values
from evomerge.search.study import Heartbeat
from evomerge.search.workers import ask, heartbeat, requeue, worker_id
from evomerge.space import SearchSpace
from evomerge.space.genome import trial_candidate
from evomerge.errors import EvomergeError
from merge_engine.errors import MergeError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
Propose = Callable[[Any, Any], Proposal]  # (space, trial) -> the candidate the trial proposes


@dataclass
class Evaluators:
    """The evaluators of one run: ``search`` scores every candidate, ``ladder`` (or None) scores
    it rung by rung on nested doc subsets of the search evaluation instead (``fidelity:``, or
    ``pruning:`` as one cheap rung; :mod:`evomerge.search.fidelity`), ``report`` scores the best
    ones on the held-out split (or None). The loop only calls ``evaluate(model, tokenizer) ->
    EvalResult`` (with ``docs=`` through the ladder).

    Lifecycle: :meth:`for_space` once per run (builds the lm-eval tasks once); :meth:`close` at
    the end (also via ``with``).
    """

    search: Any
    ladder: RungLadder | None = None
    report: Any | None = None

    @classmethod
    def for_space(cls, space: SearchSpace, device: str = "cpu") -> Evaluators:
        try:
            return cls._build(space, device)
        except (EvomergeError, MergeError, OSError):
            raise
        except Exception as err:  # noqa: BLE001  lm-eval/datasets fail on bad task files in many ways
            tasks = ", ".join(t.name for t in space.eval.tasks)
            detail = f"{type(err).__name__}: {err}".splitlines()[0].rstrip(": ")
            raise EvomergeError(f"cannot build the eval tasks {tasks} ({detail}); check each task's "
                                "YAML and that its data files exist and are not empty") from err

    @classmethod
    def _build(cls, space: SearchSpace, device: str) -> Evaluators:
        from evomerge.evaluate import TaskCatalog, make_evaluator

        catalog = TaskCatalog.for_config(space.eval)
        search = make_evaluator(space.eval, device=device, catalog=catalog)
        report = None
        if space.report_eval is not None:
            same = space.report_eval.include_paths == space.eval.include_paths
            report = make_evaluator(space.report_eval, device=device, catalog=catalog if same else None)
        return cls(search, RungLadder.for_space(space, search), report)

    def close(self) -> None:
        for ev in {id(e): e for e in (self.search, self.report) if e is not None}.values():
            ev.close()

    def __enter__(self) -> Evaluators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    best_trial: int | None = None  # the number of the trial whose values ``best`` shows


# ---------------------------------------------------------------- one candidate
def _record(trial: optuna.Trial, stage: str, result: Any) -> None:
    trial.set_user_attr(f"{stage}_scores", {t.task: t.value for t in result.tasks})
    trial.set_user_attr(f"{stage}_samples", result.n_samples)
    trial.set_user_attr(f"{stage}_seconds", round(result.wall_time_s, 3))


def run_trial(trial: optuna.Trial, space: SearchSpace, candidate: Resident, evaluators: Evaluators,
              propose: Propose = trial_candidate) -> list[float]:
    """Score one candidate; raises ``optuna.TrialPruned`` when a cheap rung stops it."""
    proposal = propose(space, trial)
    trial.set_user_attr("recipe", proposal.to_yaml())
    trial.set_user_attr("seed", {"merge": proposal.seed, "eval": space.eval.seed})
    candidate.apply(proposal)
    if evaluators.ladder is not None:
        start = time.perf_counter()
        result = climb(trial, evaluators.ladder, candidate.model, candidate.tokenizer)
        trial.set_user_attr("search_seconds", round(time.perf_counter() - start, 3))
        return objective_values(space, result, candidate.model, candidate.tokenizer)
    result = evaluators.search.evaluate(candidate.model, candidate.tokenizer)
    _record(trial, "search", result)
    trial.set_user_attr("samples", result.n_samples)
    return objective_values(space, result, candidate.model, candidate.tokenizer)


def tell_outcome(study: optuna.Study, trial: optuna.Trial, space: SearchSpace, candidate: Resident,
                 evaluators: Evaluators, propose: Propose = trial_candidate) -> TrialState:
    """Run the candidate and tell Optuna how it ended; only KeyboardInterrupt propagates."""
    try:
        values = run_trial(trial, space, candidate, evaluators, propose)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted by the user; its params were enqueued again")
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, trial)
        raise
    except Exception as err:  # a bad candidate must not end the search
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    study.tell(trial, values)
    return TrialState.COMPLETE


# ---------------------------------------------------------------- the loop
@dataclass(frozen=True)
class LoopOutcome:
    """How a loop ended: why it stopped early (None: the budget was reached) and how many of
    the candidates it ran failed."""

    stopped: str | None
    failed: int


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search_loop(study: optuna.Study, space: SearchSpace, candidate: Resident, evaluators: Evaluators,
                *, trials: int, timeout: float | None, progress: Callable[[Progress], None] | None = None,
                beat: Heartbeat | None = None, propose: Propose = trial_candidate) -> LoopOutcome:
    """Evaluate candidates until ``trials`` finished trials exist; returns why it stopped early
    (None: the budget was reached) and how many of this loop's candidates failed.
    ``beat`` (default: from the environment) says when a trial's worker counts as dead;
    ``propose(space, trial)`` builds each trial's candidate (see the module docstring)."""
    beat = beat or Heartbeat.from_env()
    start, failures = time.monotonic(), 0
    max_failures = space.budget.max_failures or max(10, trials)
    done_at_start = count_finished(study)
    while (done := count_finished(study)) < trials:
        if timeout is not None and time.monotonic() - start > timeout:
            return LoopOutcome(f"timeout of {timeout:g}s reached", failures)
        if failures >= max_failures:
            return LoopOutcome(f"{failures} candidates failed in this run; see the error column of "
                               "trials.csv", failures)
        t0 = time.monotonic()
        trial = ask(study, beat)  # first fails the trials of dead workers and retries them
        with heartbeat(study, trial):
            trial.set_user_attr("worker", worker_id())
            state = tell_outcome(study, trial, space, candidate, evaluators, propose)
        failures += state == TrialState.FAIL
        if progress is not None:
            progress(_progress(study, trial.number, state, trials, done_at_start, start, t0))
    return LoopOutcome(None, failures)


def _progress(study: optuna.Study, number: int, state: TrialState, total: int, done_at_start: int,
              start: float, t0: float) -> Progress:
    now = time.monotonic()
    done = count_finished(study)
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    rate = (now - start) / max(done - done_at_start, 1)
    eta = rate * (total - done) if done > done_at_start else None
    top = top_trials(study, 1)
    return Progress(done, total, number, state.name, frozen.values if frozen else None,
                    list(top[0].values) if top else None, now - t0, eta,
                    top[0].number if top else None)
