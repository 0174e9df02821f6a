"""The only code that touches optuna's private internals, each behind one small named function.

Tested on :data:`SUPPORTED` (pinned in pyproject.toml); importing this module with another optuna
installed raises one line naming the installed and the supported versions and the fix.
Internals used: the heartbeat helpers of ``optuna.storages._heartbeat``, a study's ``_storage``
and ``_study_id``, a trial's ``_trial_id``, a storage's ``_get_stale_trial_ids`` and the cache
wrapper's ``_backend``, ``Study._get_trials`` (what samplers read trials through), the CMA-ES
sampler's run bookkeeping (:class:`RestartingCmaEsSampler`) and the GP sampler's proposal
internals (:class:`DistinctGPSampler`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from evomerge.adapters import require_version

SUPPORTED = ("5.0", "5.1")  # optuna >=5.0,<5.1, as pinned in pyproject.toml
PIN = f"optuna>={SUPPORTED[0]},<{SUPPORTED[1]}"


def check_version(installed: str) -> None:
    """Raise :class:`~evomerge.adapters.UnsupportedVersionError` unless ``installed`` is in
    :data:`SUPPORTED`."""
    require_version("optuna", installed, *SUPPORTED, PIN)


check_version(optuna.__version__)


# ---------------------------------------------------------------- storage
def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage object a study reads and writes through."""
    return study._storage


def storage_url(storage: BaseStorage) -> str:
    """The database URL of a storage (through optuna's cache wrapper), or its class name."""
    backend = getattr(storage, "_backend", storage)
    return getattr(backend, "url", type(backend).__name__)


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number within the study)."""
    return trial._trial_id


# ---------------------------------------------------------------- heartbeats and dead trials
@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record ``trial``'s heartbeat now and every interval until the block ends (nothing on
    storages without heartbeats). The first one is written before the block starts, so a worker
    killed inside the block always leaves a trial that will be found stale."""
    storage = storage_of(study)
    if not is_heartbeat_enabled(storage):
        yield
        return
    storage.record_heartbeat(trial_id(trial))
    with get_heartbeat_thread(trial_id(trial), storage):
        yield


def heartbeat_stale_trial_ids(study: optuna.Study) -> set[int]:
    """Ids of RUNNING trials without a heartbeat for the storage's grace period (none on
    storages without heartbeats)."""
    storage = storage_of(study)
    if not is_heartbeat_enabled(storage):
        return set()
    return set(storage._get_stale_trial_ids(study._study_id))


def set_running_trial_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> bool:
    """Set a user attr of a trial that may belong to another process; False once it finished."""
    try:
        storage_of(study).set_trial_user_attr(trial_id(trial), key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def fail_if_running(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Mark ``trial`` FAIL unless it already finished. True for exactly one caller: of several
    workers that find the same dead trial, only the one whose update lands retries it."""
    try:
        return storage_of(study).set_trial_state_values(trial_id(trial), state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


# ---------------------------------------------------------------- samplers
class PrunedAsComplete:
    """A read-only view of a study in which each pruned trial with a reported value looks
    complete, valued at its last report (the cheap-first score). Samplers read trials through
    ``Study._get_trials``, so that is the method this view answers."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> object:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: object = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        wanted = None if states is None else tuple(states)
        ask = None if wanted is None else tuple(set(wanted) | {TrialState.PRUNED})
        out = []
        for t in self._study._get_trials(deepcopy=False, states=ask, use_cache=use_cache):
            if t.state == TrialState.PRUNED:
                if not t.intermediate_values or (wanted is not None and TrialState.COMPLETE not in wanted):
                    continue
                t = copy.deepcopy(t)
                t.state = TrialState.COMPLETE
                t.values = [t.intermediate_values[max(t.intermediate_values)]]
            out.append(t)
        return out


class RestartingCmaEsSampler(optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES with IPOP restarts: when the current run's optimizer says it has converged
    (``should_stop``: its step size, its spread of values or its covariance has collapsed, which a
    score measured on a few docs reaches quickly), the next trial starts a fresh run with twice the
    population (Auger & Hansen 2005), at most ``max_restarts`` times.

    Optuna 4.4 dropped ``restart_strategy``; this brings it back the way optuna used to store it:
    run ``r`` keeps its optimizer and generation counter under its own system-attr prefix (run 0
    under optuna's own ``cma:``, so a study started by the plain sampler resumes unchanged), and
    the run a trial belongs to is read from the study, so every worker sharing the storage agrees
    on it. Private internals used: the sampler's ``_attr_prefix``, ``_popsize``, ``_get_trials``
    and ``_restore_optimizer``.
    """

    def __init__(self, *, popsize: int | None = None, max_restarts: int = 8, **kwargs: Any) -> None:
        super().__init__(popsize=popsize, **kwargs)
        self._first_prefix, self._first_popsize = self._attr_prefix, popsize
        self.max_restarts = max_restarts

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        if search_space and len(study.directions) == 1:
            self._enter_run(self.current_run(study, len(search_space)), len(search_space))
        return super().sample_relative(study, trial, search_space)

    def current_run(self, study: optuna.Study, dim: int) -> int:
        """The restart a new trial belongs to: the latest run recorded in the study, or the next
        one when that run's optimizer has converged."""
        trials = self._get_trials(study)
        run = max((self._run_of(t) for t in trials), default=0)
        self._enter_run(run, dim)
        optimizer = self._restore_optimizer(trials)
        if optimizer is not None and optimizer.should_stop() and run < self.max_restarts:
            run += 1
        return run

    def _enter_run(self, run: int, dim: int) -> None:
        self._attr_prefix = self._first_prefix if run == 0 else f"{self._first_prefix}ipop{run}:"
        base = self._first_popsize or 4 + int(3 * math.log(dim))  # the cmaes library's default
        self._popsize = base * 2 ** run if run else self._first_popsize

    def _run_of(self, trial: FrozenTrial) -> int:
        for key in trial.system_attrs:
            if key.startswith(f"{self._first_prefix}ipop") and key.endswith(":generation"):
                return int(key[len(self._first_prefix) + 4:-len(":generation")])
        return 0


class DistinctGPSampler(optuna.samplers.GPSampler):
    """Optuna's GP that never keeps a point an earlier trial already holds.

    Optuna's GP accounts for running trials (qLogEI over their published points), but two
    workers that ask at the same moment both fit the same data before either has published, and
    the acquisition optimizer often lands both on the same point (a corner of the box): measured
    with three workers on one SQLite study, two or three of ten trials were exact repeats. So
    each proposal is published first, then compared with every other trial (running, complete or
    pruned); on a clash this trial proposes again (now seeing the other point), at most
    ``attempts`` times, then withdraws its proposal and leaves its parameters to the independent
    sampler (seeded per worker). Two trials cannot both keep one point: each compares after
    publishing, so the one that compares last sees the other (both may move; neither stays on
    the other's point). A point the study already evaluated is proposed again by the same rule,
    so it is never scored twice.

    Private internals used: ``_sample_relative_impl``, ``_n_startup_trials``, and the
    ``gp:relative_params`` system attrs and ``_get_params`` through which workers publish and
    read proposals.
    """

    attempts = 3

    def _view(self, study: optuna.Study) -> optuna.Study:
        """The study as the GP fits it (a subclass shows pruned trials as complete)."""
        return study

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        import torch

        if not search_space:
            return {}
        view, chunks = self._view(study), 0
        for _ in range(self.attempts):
            trials = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING),
                                      use_cache=False)
            completed = [t for t in trials if t.state == TrialState.COMPLETE]
            if len(completed) < self._n_startup_trials:
                return {}
            running = [t for t in trials if t.state == TrialState.RUNNING and t.number != trial.number
                       and search_space.keys() <= _gp_params(t).keys()]
            with torch.device("cpu"):
                params = self._sample_relative_impl(view, completed, running, search_space)
            chunks = _publish(study, trial, params, chunks)
            if not _held_elsewhere(study, trial, params):
                return params
        _publish(study, trial, {}, chunks)  # withdrawn: other workers no longer avoid it
        return {}


def _gp_params(trial: FrozenTrial) -> dict[str, Any]:
    from optuna.samplers._gp.sampler import _get_params

    return _get_params(trial)


def _publish(study: optuna.Study, trial: FrozenTrial, params: dict[str, Any], chunks: int) -> int:
    """Store ``params`` as the trial's proposal where other workers' GPs read it, in at least
    ``chunks`` pieces (a shorter text is padded, so no piece of an earlier one is left after
    it); returns the number of pieces written."""
    from optuna.samplers._gp.sampler import _RELATIVE_PARAMS_KEY, _SYSTEM_ATTR_MAX_LENGTH

    size = _SYSTEM_ATTR_MAX_LENGTH
    text = json.dumps(params).ljust((chunks - 1) * size + 1)  # at least `chunks` pieces
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        storage_of(study).set_trial_system_attr(trial_id(trial), f"{_RELATIVE_PARAMS_KEY}:{i}", piece)
    return len(pieces)


def _held_elsewhere(study: optuna.Study, trial: FrozenTrial, params: dict[str, Any]) -> bool:
    """Whether another trial (running, complete or pruned) holds ``params``."""
    states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    for t in study._get_trials(deepcopy=False, states=states, use_cache=False):
        if t.number != trial.number:
            other = _gp_params(t)
            if params.keys() <= other.keys() and all(_same(params[k], other[k]) for k in params):
                return True
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
